"""The table that drives the parity, error and interchange tests: one entry per algorithm.

Option sets come from torch's own ``optim_db`` (the configs torch tests itself with), plus the
options it leaves out on CPU; the implementation flags are stripped, since tests choose them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.testing._internal.common_optimizers import optim_db

import fuseopt

IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")


@dataclass
class Algorithm:
    name: str
    ours: type
    extra_configs: list[dict] = field(default_factory=list)

    @property
    def info(self):
        return next(o for o in optim_db if o.optim_cls.__name__ == self.name)

    @property
    def theirs(self) -> type:
        return getattr(torch.optim, self.name)

    @property
    def supports_complex(self) -> bool:
        return self.info.supports_complex

    def configs(self) -> list[tuple[str, dict]]:
        """(id, kwargs) for torch's CPU option sets and ours, implementation flags removed."""
        out, seen = [], set()
        inputs = self.info.optim_inputs_func(device="cpu", dtype=torch.float32)
        pairs = [(i.desc, i.kwargs) for i in inputs] + [
            (",".join(f"{k}={v}" for k, v in kw.items()), kw) for kw in self.extra_configs
        ]
        for desc, kwargs in pairs:
            kwargs = {k: v for k, v in kwargs.items() if k not in IMPL_KEYS}
            key = repr(sorted(kwargs.items()))
            if key not in seen:
                seen.add(key)
                out.append((desc.replace(" ", "_"), kwargs))
        return out


ALGORITHMS = [
    Algorithm(
        "SGD",
        fuseopt.SGD,
        [
            dict(momentum=0.9, maximize=True),
            dict(momentum=0.9, nesterov=True),
            dict(momentum=0.5, dampening=0.3, weight_decay=0.2, maximize=True),
        ],
    ),
    Algorithm(
        "Adam",
        fuseopt.Adam,
        [
            dict(weight_decay=0.1, decoupled_weight_decay=True),
            dict(weight_decay=0.1, amsgrad=True, maximize=True, decoupled_weight_decay=True),
            dict(lr=torch.tensor(0.01), betas=(0.8, 0.9), eps=1e-6),
            dict(lr=0.01, betas=(torch.tensor(0.8), torch.tensor(0.95))),
        ],
    ),
    Algorithm(
        "AdamW",
        fuseopt.AdamW,
        [dict(amsgrad=True, maximize=True), dict(lr=torch.tensor(0.01), weight_decay=0.5)],
    ),
    Algorithm("Adadelta", fuseopt.Adadelta, [dict(rho=0.5, eps=1e-3, maximize=True)]),
    Algorithm(
        "Adagrad",
        fuseopt.Adagrad,
        [dict(lr_decay=0.1, initial_accumulator_value=0.2, weight_decay=0.1, maximize=True)],
    ),
    Algorithm("Adamax", fuseopt.Adamax, [dict(betas=(0.5, 0.8), eps=1e-3, weight_decay=0.2)]),
    Algorithm("ASGD", fuseopt.ASGD, [dict(t0=5, lambd=0.1, alpha=0.5, weight_decay=0.1)]),
    Algorithm(
        "NAdam",
        fuseopt.NAdam,
        [dict(momentum_decay=0.1, weight_decay=0.1, decoupled_weight_decay=True, maximize=True)],
    ),
    Algorithm(
        "RAdam",
        fuseopt.RAdam,
        [dict(betas=(0.8, 0.9), weight_decay=0.1, decoupled_weight_decay=True, maximize=True)],
    ),
    Algorithm(
        "RMSprop",
        fuseopt.RMSprop,
        [dict(momentum=0.5, centered=True, weight_decay=0.1, maximize=True)],
    ),
    Algorithm("Rprop", fuseopt.Rprop, [dict(etas=(0.3, 1.5), step_sizes=(1e-3, 0.05))]),
]

BY_NAME = {a.name: a for a in ALGORITHMS}


def cases():
    """(algorithm, config id, kwargs) for every algorithm and option set."""
    return [(a, desc, kw) for a in ALGORITHMS for desc, kw in a.configs()]
