r"""The generator's yardsticks: what a generated dataset looks like and what it teaches an FR model.

  python -m vigface_jax.main --config=configs/quality.py:demo \
      --config.generated.workdir=workdir/gen_demo --config.name="demo 48px/6" \
      --workdir=workdir/quality

`generated.workdir` is a finished `configs/generate.py` run with an `imagefolder` export. The
task (`evaluate/quality.py`) takes its first `num_ids` exported identities × `images_per_id`
images and trains the `fr` recipe (`configs/fr.py:usefulness`: k = 0, 1,000 steps) on them,
and the same recipe once on `num_ids` real procedural identities × `images_per_id` (cached
in `workdir/real/` and reused while the recipe is unchanged); both are verified on the same
held-out procedural pairs. Beside that usefulness ratio, a row of `workdir/quality.md` (and
`quality.json`) carries the generation run's own dataset metrics under the independent
encoder (realism, identity consistency, separability, diversity; each next to real data's)
and the stage-2 and sampler settings, and `workdir/rows/<name>/sheet.png` puts generated
faces above real ones. Rows accumulate: a run with a new `name` adds one, the same name
replaces it.

`fr_seeds = (0, 1, 2)` repeats both FR runs under each seed and reports mean ± std over
seeds (the ratio taken per seed), with the ratio above chance, (acc − 50) / (acc_real − 50).

`control = 'shuffled_labels'` is the yardstick's own control: the same images with their
identity labels permuted (seeded), so the set teaches no identity. Its ratio must fall to
near the untrained baselines' level; a usefulness figure is only evidence beside it.

Variants: demo (the CPU demo's sizes), tiny (seconds, for tests).
"""

import importlib.util
import os

from ml_collections import config_dict

from vigface_jax import config_lib


def _fr_config(variant: str) -> config_dict.ConfigDict:
  """`configs/fr.py:<variant>`, loaded by path (configs/ need not be an installed package)."""
  spec = importlib.util.spec_from_file_location(
      "_vigface_fr_config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fr.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = config_lib.parse_arg(arg, variant="demo")
  if args.variant not in ("demo", "tiny"):
    raise ValueError(f"configs/quality.py: unknown variant {args.variant!r}; use demo or tiny")
  tiny = args.variant == "tiny"
  config = config_dict.ConfigDict()
  config.task = "quality"
  # Multi-host start-up only; the fr runs use the mesh of their own section (config.fr).
  config_lib.add_parallelism(config)
  config.generated = config_dict.ConfigDict()
  config.generated.workdir = config_dict.placeholder(str)  # a finished configs/generate.py run
  config.name = config_dict.placeholder(str)  # the row's name; None = the generate workdir's
  config.note = ""  # free text shown in the row (what was changed)
  config.num_ids = 4 if tiny else 200  # identities in each training set
  config.images_per_id = 2 if tiny else 20  # images of each identity
  config.control = "none"  # none | shuffled_labels (see the module docstring)
  config.control_seed = 0  # the permutation of shuffled_labels
  # Real identities of the baseline: procedural ids real_offset.. under the data seed of the
  # fr recipe (0 = the first people stage 1 and stage 2 were trained on).
  config.real_offset = 0
  # FR seeds (fr.train.seed: initialisation and data order) both runs are repeated under;
  # () = the recipe's own seed, one run each. At demo size the figure moves ~3 points between
  # seeds, so compare levers on several: (0, 1, 2) reports mean ± std and the per-seed ratio.
  config.fr_seeds = ()
  config.sheet_ids = 2 if tiny else 8  # sheet rows per block (generated, then real)
  config.sheet_images = 2 if tiny else 8  # sheet columns
  # The FR recipe both sets are learnt with; its data section is set by the task.
  config.fr = _fr_config("tiny_usefulness" if tiny else "usefulness")
  return config
