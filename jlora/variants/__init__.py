"""LoRA variants as pure functions over trees of `jlora.LoRA` nodes.

- Initialisations (`init`): `pissa` (exact or randomized SVD), `olora`,
  `gaussian`, and `initialize` by PEFT's ``init_lora_weights`` name.
- LoRA+ and LoRA-FA (`loraplus`): `labels` for ``optax.multi_transform``
  and `loraplus_optimizer`.
- DyLoRA (`dylora`): `truncate`, `mask_rank`, `sample`.
- ReLoRA (`relora`): `restart`, `prune_moments`, `jagged_schedule`.
- AdaLoRA (`adalora`): ``adalora.prepare``, ``adalora.regularizer``,
  ``adalora.init``, ``adalora.update``, ``adalora.budget``.

DoRA and rsLoRA are fields/options of the node itself (``m``, ``rslora``).

Examples:
  >>> lp = jlora.variants.pissa(jlora.apply(params, rank=8, key=key))
  >>> tx = jlora.variants.loraplus_optimizer(optax.adamw, 2e-4, ratio=16.0)
"""

from jlora import initializers as init
from jlora.variants import adalora, dylora, loraplus, relora
from jlora.variants.adalora import AdaLoRAState
from jlora.variants.dylora import mask_rank, sample, sample_rank, truncate
from jlora.initializers import (gaussian, initialize, olora, pissa,
                                randomized_svd)
from jlora.variants.loraplus import labels
from jlora.variants.loraplus import optimizer as loraplus_optimizer
from jlora.variants.relora import (jagged_schedule, prune_by_magnitude,
                                   prune_moments, restart)

__all__ = [
    "AdaLoRAState", "adalora", "dylora", "gaussian", "init", "initialize",
    "jagged_schedule", "labels", "loraplus", "loraplus_optimizer",
    "mask_rank", "olora", "pissa", "prune_by_magnitude", "prune_moments",
    "randomized_svd", "relora", "restart", "sample", "sample_rank",
    "truncate",
]
