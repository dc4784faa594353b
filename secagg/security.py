"""The collusion bounds of masking aggregation against an actively malicious server, as arithmetic.

Setting (Bonawitz et al., CCS 2017, section 6; Bell et al., CCS 2020): a server that deviates arbitrarily from the
protocol, colluding with ``c`` provisioned clients. Every honest client checks the nested sets U1 >= U2 >= U3 >= U4
of :mod:`secagg.masking`, signs one survivor list U3 and unmasks only on that list with ``t`` roster-valid
signatures on it.

* **One survivor list.** Two different lists that both collect t signatures need disjoint honest signer sets H1, H2
  with ``|H1| + c >= t`` and ``|H2| + c >= t``. A node v's secrets are shared among ``m`` holders (v itself and its
  neighbours: ``m = n`` on the complete graph, ``m = k + 1`` on the SecAgg+ graph of degree k). The server obtains
  both secrets of v (the self-mask seed *and* the mask key, which together unmask v's input) only if both kinds
  reach t shares among v's holders: ``m >= 2t - c_v``, with ``c_v`` the corrupt holders of v's shares. So
  **2t > m + c_v** rules it out: :func:`tolerated_corruptions` is the largest such c_v.
* **What the server learns.** With one list, it learns the sum of the inputs in U3 and nothing else about honest
  inputs; every honest client u in U3 has, by its own check, at least t - 1 partners in U3 whose shares it used, so
  its input is summed with at least ``t - 1 - c_u`` other honest inputs (on the SecAgg+ graph the server may learn
  sums of several disjoint groups of that size instead of one).
* **Default threshold** (:func:`default_threshold`): ``floor(2m/3) + 1``, which tolerates ``c_v < m/3``: the
  paper's t > 2n/3 with fewer than n/3 corrupt clients.
* **SecAgg+ graph.** The neighbourhoods come from the provisioned graph seed, not from the server, so a corrupt
  set of size C is spread over neighbourhoods as a uniformly random subset of the roster;
  :func:`secagg_plus_failure_probability` bounds the probability that some neighbourhood holds more than
  :func:`tolerated_corruptions` corrupt nodes (a union bound over the nodes of a hypergeometric tail).
"""

from __future__ import annotations

import math

from fedmpt.errors import ConfigError


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def share_holders(roster_size: int, neighbourhood_size: int | None) -> int:
    """m: how many nodes hold shares of one node's secrets (itself and its neighbours)."""
    n = _int("roster_size", roster_size, 2)
    if neighbourhood_size is None or neighbourhood_size >= n - 1:
        return n
    return _int("neighbourhood_size", neighbourhood_size, 2) + 1


def default_threshold(roster_size: int, neighbourhood_size: int | None = None) -> int:
    """``floor(2m/3) + 1`` for m share holders: secure against an active server colluding with fewer than m/3 of
    them (at least 2)."""
    return max(2, 2 * share_holders(roster_size, neighbourhood_size) // 3 + 1)


def tolerated_corruptions(threshold: int, roster_size: int, neighbourhood_size: int | None = None) -> int:
    """Largest number c of corrupt share holders with 2t > m + c, i.e. ``2t - m - 1``.

    A value of 0 means: secure against an active server that colludes with no client; a negative value means the
    threshold is too low for an active server at all (two survivor lists could each collect t signatures).
    """
    t = _int("threshold", threshold, 2)
    return 2 * t - share_holders(roster_size, neighbourhood_size) - 1


def secagg_plus_failure_probability(roster_size: int, neighbourhood_size: int, threshold: int, corrupt: int) -> float:
    """Union bound on P[some node's holder set holds more than ``tolerated_corruptions`` of ``corrupt`` nodes].

    The graph is the k-regular ring of :func:`secagg.masking.neighbour_graph` placed by the provisioned seed, so the
    k neighbours of a node v are a uniform k-subset of the other N - 1 roster nodes, whatever the corrupt set is.
    With v honest, the corrupt holders of v's shares are hypergeometric(N - 1, C, k); with v corrupt, v's own input
    needs no protection. Returns ``min(1, N * P[X > c_max])``.
    """
    n = _int("roster_size", roster_size, 2)
    k = _int("neighbourhood_size", neighbourhood_size, 2)
    c = _int("corrupt", corrupt, 0)
    if c > n:
        raise ConfigError(f"corrupt={c} exceeds roster_size={n}")
    c_max = tolerated_corruptions(threshold, n, k)
    if k >= n - 1:
        return 0.0 if c <= c_max else 1.0
    if c_max < 0:
        return 1.0
    total = math.comb(n - 1, k)
    tail = sum(math.comb(c, x) * math.comb(n - 1 - c, k - x) for x in range(c_max + 1, min(c, k) + 1))
    return min(1.0, n * tail / total)
