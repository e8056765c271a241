"""Where to put the exits (survey §4): candidates, their costs, and the placement rules.

Typical use::

    cand_net = with_candidate_exits(backbone, head="pool")      # a head at every boundary
    train_candidate_heads(cand_net, train)                       # quick, backbone frozen
    cands = candidate_costs(cand_net, x[:256], cost="flops")     # or cost="latency"
    for p in place(cands, ExitRecord.collect(cand_net, val), ExitRecord.collect(cand_net, test)):
        print(p.rule, p.exits, p.cost, p.accuracy)

``offramp place CONFIG`` runs the same from a config file (:mod:`offramp.jobs.place`).
"""

from offramp.placement.estimate import (
    COSTS,
    candidate_costs,
    cost_table,
    format_cost_table,
    train_candidate_heads,
    with_candidate_exits,
)
from offramp.placement.place import RULES, Placement, place, placement_table
from offramp.placement.problem import (
    Candidates,
    OperatingPoint,
    PlacementRecord,
    evaluate_subsets,
    operating_points,
    subset_mask,
)
from offramp.placement.rules import (
    MAX_EXHAUSTIVE,
    SDN_FRACTIONS,
    exhaustive,
    flops_spacing,
    greedy,
    members,
    pays,
    prune,
)

__all__ = [
    "COSTS",
    "MAX_EXHAUSTIVE",
    "RULES",
    "SDN_FRACTIONS",
    "Candidates",
    "OperatingPoint",
    "Placement",
    "PlacementRecord",
    "candidate_costs",
    "cost_table",
    "evaluate_subsets",
    "exhaustive",
    "flops_spacing",
    "format_cost_table",
    "greedy",
    "members",
    "operating_points",
    "pays",
    "place",
    "placement_table",
    "prune",
    "subset_mask",
    "train_candidate_heads",
    "with_candidate_exits",
]
