r"""Preview of the embedded default data: contact sheet, verification pack, trivial baselines.

  python -m vigface_jax.main --config=configs/preview.py --workdir=/tmp/vigface_preview

Variants (`--config=configs/preview.py:<variant>`):
  default  3,000 pairs over 600 held-out identities (the figures README reports).
  tiny     40 pairs, for tests (seconds).
"""

from ml_collections import config_dict

from vigface_jax import config_lib


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = config_lib.parse_arg(arg, variant="default")
  if args.variant not in ("default", "tiny"):
    raise ValueError(f"configs/preview.py: unknown variant {args.variant!r}; use default or tiny")
  tiny = args.variant == "tiny"
  config = config_dict.ConfigDict()
  config.task = "preview"  # which job vigface_jax.main runs
  config.seed = 0  # procedural world seed: identities, images and pairs all derive from it
  config_lib.add_parallelism(config)

  config.sheet = config_dict.ConfigDict()
  config.sheet.num_identities = 3 if tiny else 6  # contact-sheet rows
  config.sheet.yaws = (-60.0, 0.0, 60.0) if tiny else (-60.0, -40.0, -20.0, 0.0, 20.0, 40.0, 60.0)

  config.pairs = config_dict.ConfigDict()
  config.pairs.num_pairs = 40 if tiny else 3000  # half genuine, half hard-negative impostor
  config.pairs.num_folds = 10  # contiguous identity-disjoint folds (the 10-fold protocol)
  config.pairs.identities_per_fold = 6 if tiny else 60  # held-out identities per fold
  config.pairs.identity_offset = 1_000_000  # first held-out identity id (training uses 0..n-1)
  config.pairs.hard_negative_k = 3  # impostor = one of the k most similar-looking identities
  config.pairs.image_format = "jpeg"  # 'jpeg' (as insightface packs) or 'png'

  config.baselines = config_dict.ConfigDict()
  config.baselines.enabled = True  # score raw pixels and a random network on the pack
  config.baselines.batch_size = 40 if tiny else 200  # images per embedding call
  return config
