r"""Stage 3: a dataset of virtual identities, exported for FR trainers, with its privacy audit.

  python -m vigface_jax.main --config=configs/generate.py:B \
      --config.stage1.workdir=/runs/stage1 --config.stage2.workdir=/runs/stage2 \
      --config.audit.encoders='("/models/insightface_r100",)' --workdir=/runs/vigface_b

`stage1.workdir` is a finished `configs/fr.py` run (its `prototypes.npz` holds the virtual rows
drawn here and its `export/` is one of the audit's encoders); `stage2.workdir` a finished
`configs/dit.py` run trained on that stage 1's real rows. Every image `(label, index)` gets
its own noise and landmark set from `(seed, label, index)`, so the dataset does not depend on
batch size, shard layout or device count; shards are written under temporary names, recorded
in `manifest.json`, and a rerun of an interrupted job continues from the finished shards.

Variants (`--config=configs/generate.py:<variant>`):
  S        VIGFace(S): 10,000 virtual identities × 50 images (0.5M).
  B        VIGFace(B): 60,000 × 20 (1.2M). The default.
  L        VIGFace(L): 120,000 × 50 (6M).
  augment  real rows: every real class with fewer than 50 images topped up to 50 with images
           drawn from its own row (the paper's augmentation mode).
  demo     the CPU demo after `configs/fr.py:demo`, `configs/dit.py:demo` and
           `configs/fr.py:auditor`: 212 virtual identities × 20 images (212 so that at least
           200 remain when the audit drops the ~1-3% of identities its calibration flags in
           unrelated people too), each virtual row drawn inside the real rows' span and
           relaxed away from them (row_span 0.99, 300 steps), guidance 2.0, the audit under
           the stage-1 network and the auditor, the dataset metrics, the generalisation and
           landmark-identity checks, the contact sheet.
           README "Stage 3" has what it measured.
  tiny     seconds, for tests.
"""

from ml_collections import config_dict

from vigface_jax import config_lib

SIZES = {"S": (10_000, 50), "B": (60_000, 20), "L": (120_000, 50)}


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = config_lib.parse_arg(arg, variant="B")
  variants = ("S", "B", "L", "augment", "demo", "tiny")
  if args.variant not in variants:
    raise ValueError(f"configs/generate.py: unknown variant {args.variant!r}; use one of "
                     f"{variants}")
  demo, tiny = args.variant == "demo", args.variant == "tiny"
  config = config_dict.ConfigDict()
  config.task = "generate"
  # The sampler's batch splits over the mesh's batch axes; each process generates its own
  # shards on its own devices (generation needs no communication between processes).
  config_lib.add_parallelism(config)

  config.stage1 = config_dict.ConfigDict()
  config.stage1.workdir = config_dict.placeholder(str)  # a finished configs/fr.py run
  config.stage2 = config_dict.ConfigDict()
  config.stage2.workdir = config_dict.placeholder(str)  # a finished configs/dit.py run
  # Which of its weights draw: 'ema' (its EMA, as its evaluators) or 'raw' (the last step's).
  config.stage2.weights = "ema"

  num_ids, per_id = SIZES.get(args.variant, (0, 0))
  if demo:
    num_ids, per_id = 212, 20
  elif tiny:
    num_ids, per_id = 4, 2
  # 'virtual': identity i is drawn from virtual row `rows_order[i]` (stage 1's k rows);
  # 'real': real rows (augment mode: `num_ids` None = every class with fewer than augment_to).
  config.rows = "real" if args.variant == "augment" else "virtual"
  config.num_ids = config_dict.placeholder(int) if args.variant == "augment" else num_ids
  config.images_per_id = per_id if per_id else config_dict.placeholder(int)  # augment: per class
  config.augment_to = 50  # rows='real': top every class with fewer images up to this many
  # Which virtual rows: 'first' (rows 0..num_ids−1) or 'random' (a seeded choice among k).
  config.row_order = "random"
  # Rows of that order skipped first. A tuning run (sampler settings chosen on people the
  # headline never sees) sets row_offset = the headline's num_ids: disjoint rows, same seed.
  config.row_offset = 0
  # None: each virtual row as stage 1 learnt it (the paper). A share in (0, 1]: each virtual
  # row projected onto the real rows' principal directions holding that share of their energy,
  # renormalised (evaluate/prototypes.py project_to_real_span). Stage 1 trains a virtual row
  # only through real faces' features, which stay in the real rows' span, so its part outside
  # (the demo's: 73% of its energy in 93 of 128 directions) is its random initialisation, and
  # the DiT's row projection never learnt it either. The summary records the drawn rows'
  # distance to the real ones (`row_span`).
  # The demo draws inside the span (README "Generator quality", lever M: faces with eyes, nose,
  # mouth and hairline instead of blobs, images at their rows); real-scale variants keep the
  # paper's rows.
  config.row_span = 0.99 if demo else config_dict.placeholder(float)
  # With row_span: steps moving each projected row away from the real rows and the other
  # virtual rows inside the span (prototypes.relax_in_span, ArcFace's logits at s = 32 with
  # the row as a class no face belongs to, as stage 1 treats it). Projection alone brings a
  # row nearer its nearest real row (the demo: p99 0.36 -> 0.64, past real rows' median 0.56);
  # 300 steps take it to 0.33. 0 = projection only.
  config.row_relax_steps = 300 if demo else 0
  # With row_span, after the relaxation: 'span' = each row as projected and relaxed; 'real' =
  # each coordinate then scaled by the real rows' root-mean-square along that direction
  # (prototypes.shape_like_real). Projected rows spread their energy evenly over the span
  # (their initialisation was isotropic) and the relaxation, moving them away from real rows,
  # pushes them further into the directions real rows use least (the demo's first 10 of 35
  # directions: 60% of real rows' energy, 27% of projected rows', 16% of relaxed ones'), so
  # virtual identities differ along directions that barely change a face. 'real' gives them
  # the real rows' profile back (the demo: 42%) at the cost of nearness to real rows (p99
  # 0.33 -> 0.55, the real rows' own median nearest other 0.56).
  config.row_shape = "span"
  config.seed = 0  # noise, poses and row choice derive from it
  config.batch_size = 4 if tiny else (50 if demo else 256)  # images per sampler call (global)
  # Identities per shard: the unit of writing, checksumming and resuming.
  config.ids_per_shard = 2 if tiny else (16 if demo else 200)
  config.image_format = "png"  # png (lossless) | jpeg
  config.jpeg_quality = 95
  config.formats = ("imagefolder", "recordio", "arrayrecord")  # any subset, at least one

  # The sampler; None = the stage-2 run's own `sample.*` value (its config.json).
  config.sample = config_dict.ConfigDict()
  config.sample.num_steps = 2 if tiny else config_dict.placeholder(int)  # DDIM steps
  config.sample.eta = config_dict.placeholder(float)  # DDIM η
  config.sample.spacing = config_dict.placeholder(str)  # leading | trailing | linspace
  # Classifier-free guidance scale: the paper's 4.0; the demo's 2.0 was chosen on the tuning
  # rows with in-span rows (README "Generator quality", lever M: 4.0 draws near copies).
  config.sample.guidance = 2.0 if demo else 4.0
  config.sample.guidance_interval = config_dict.placeholder(tuple)  # (t_lo, t_hi) or None
  config.sample.guidance_rescale = config_dict.placeholder(float)  # φ, 0 = off
  # Each image drawn from its identity's row plus this much noise (inside the real rows' span
  # with row_span), renormalised: cosine ≈ 1/√(1 + jitter²) to the row; 0 = every image of an
  # identity from the same row (the paper). Aims at images that vary more within an identity.
  config.sample.row_jitter = 0.0
  # For a stage-2 DiT trained with diffusion.condition='image' (its condition is an image's
  # feature, not a row): this many real training images' stage-1 features are split about
  # their class rows (cosine a, unit residual u ⟂ row), and each generated image is conditioned
  # on its identity's row v with a bank entry transplanted, a·v + √(1−a²)·u⊥v: as far from its
  # row as a real image's feature is from its class's. 0 = condition on the row itself. Ignored
  # for the paper's row-conditioned DiT. README "Generator quality", lever Q.
  config.sample.residual_bank = 0 if tiny else 512

  # Each image's five-point landmark set: 'model' = drawn from a Gaussian mixture fitted on
  # the training data's aligned landmark sets (saved as pose_model.npz; no real person's set
  # is copied), 'pool' = a training image's set copied (the paper).
  config.pose = config_dict.ConfigDict()
  config.pose.source = "model"
  config.pose.num_components = 2 if tiny else 8  # mixture components
  config.pose.fit_images = 64 if tiny else 4000  # training landmark sets the model is fitted on
  # 'model' sets: each set's offset from the mixture's mean scaled by this (1 = the fitted
  # poses; > 1 asks a generator that turns its faces less far than asked for wider poses).
  config.pose.spread = 1.0

  config.run_audit = True  # audit (and with audit.drop_flagged, filter) before exporting
  # Every field: config_lib.audit_config. The demo's auditor is a configs/fr.py:auditor run.
  config.audit = config_lib.audit_config(
      heldout_ids=8 if tiny else 400, heldout_images=per_id or 20,
      leak_ids=2 if tiny else (24 if demo else 100),
      fmrs=(1e-2,) if tiny else (1e-3, 1e-4))  # tiny: 128 training images give 7,680 pairs

  # Controls and checks run beside the dataset (each a few images per identity).
  config.checks = config_dict.ConfigDict()
  # Generalisation (procedural data only): fresh people neither stage saw get a row from the
  # stage-1 network (mean of `fresh_centre_images` embeddings); the DiT draws `fresh_images`
  # each, identified under the encoders among the fresh people's own (other) images.
  config.checks.fresh_ids = 2 if tiny else (24 if demo else 32)
  config.checks.fresh_images = 2 if tiny else 4
  config.checks.fresh_centre_images = 2 if tiny else 8
  config.checks.fresh_offset = 4_000_000  # their first procedural identity id
  # Landmark identity: this many identities re-drawn with pose.source 'pool' (the other
  # source) to measure how well the landmark set's owner is identified from the images.
  config.checks.pool_ids = 2 if tiny else (24 if demo else 32)
  config.checks.pool_images = 2 if tiny else 4
  # Dataset metrics compare the generated set with this many real training identities.
  config.checks.real_ids = 4 if tiny else 200
  # Contact sheet (paper Figure 4): identities × images, beside real training faces.
  config.checks.sheet_ids = 2 if tiny else 8
  config.checks.sheet_images = 2 if tiny else 8
  return config
