r"""Stage 2: pixel-space DiT drawing a face from a class centre and a landmark image (DESIGN §1).

  python -m vigface_jax.main --config=configs/dit.py \
      --config.data.path=/data/faces_webface_112x112/train.rec \
      --config.stage1.workdir=/runs/stage1 --workdir=/runs/stage2

`stage1.workdir` is a finished stage-1 run (`configs/fr.py`): its `export/` backbone is the
frozen FR network of the identity loss and of the identity-consistency evaluation, and its
`prototypes.npz` holds the real class-centre rows the DiT is conditioned on. Train stage 2 on
the same data as stage 1 (the labels must index the same rows).

Variants (`--config=configs/dit.py:<variant>`):
  default  CASIA-WebFace RecordIO, DiT-B/8 on 112×112 pixels (196 tokens: the patch size 8
           keeps attention cheap at full resolution; DiT-L/8 is the larger option), v-prediction,
           cosine schedule T = 1000, AdamW lr 1e-4, EMA 0.9999, global batch 256, condition
           dropout 0.1, identity-loss weight 0.05 on t < 300, DDIM 50 steps with guidance 4.0.
  demo     procedural faces (the data of `configs/fr.py:demo`), a small DiT with 16×16 patches
           scanned over depth and cross-faded 4-pixel output margins, the landmark image plus
           two blurred copies (σ = 6, 16 px), x0-prediction, 1,800 steps of 32 for a 2-core
           CPU (22–26 min to the last step, depending on the machine), then the sheet and the
           evaluations at guidance 4.0 (guided on t ∈ [150, 880], rescale 0.7, DDIM η = 1)
           and a sheet and identity figures at 1.0 (4–5 min). Measured (28 min 17 s in all):
           samples from 200 real rows identified as their own identity among 800 94.5% top-1
           at guidance 4.0, 93.5% at 1.0; drawn with left- and right-turned landmark sets,
           the faces turn the right way in 92% of pairs and 0.35 as much as real faces;
           moved dots move them all the way (1.00 horizontally and vertically). The samples
           are blurry faces, see README "Stage 2".
  tiny     seconds, for tests.
"""

from ml_collections import config_dict

from vigface_jax import config_lib

CASIA_IMAGES = 490_623


def get_config(arg: str | None = None) -> config_dict.ConfigDict:
  args = config_lib.parse_arg(arg, variant="default")
  if args.variant not in ("default", "demo", "tiny"):
    raise ValueError(f"configs/dit.py: unknown variant {args.variant!r}; use default, demo or "
                     "tiny")
  demo, tiny = args.variant == "demo", args.variant == "tiny"
  small = demo or tiny
  config = config_dict.ConfigDict()
  config.task = "dit"
  config_lib.add_parallelism(config)

  config.stage1 = config_dict.ConfigDict()
  config.stage1.workdir = config_dict.placeholder(str)  # a finished configs/fr.py run

  config.data = config_dict.ConfigDict()
  config.data.source = "procedural" if small else "recordio"
  config.data.path = config_dict.placeholder(str)
  config.data.seed = 0  # for procedural faces: must equal the stage-1 run's data.seed
  config.data.global_batch_size = 4 if tiny else (32 if demo else 256)
  config.data.flip_prob = 0.5
  config.data.worker_count = 0 if small else 8
  config.data.read_threads = 0 if small else 16
  config.data.num_identities = 16 if tiny else 800  # procedural: as in configs/fr.py
  config.data.images_per_identity = 8 if tiny else 24
  config.data.cache = small

  config.model = config_dict.ConfigDict()
  config.model.variant = "tiny" if tiny else ("small" if demo else "B")  # dit.VARIANTS
  config.model.patch_size = 16 if small else 8  # must divide 112
  config.model.dtype = "auto"  # bfloat16 on GPU/TPU, float32 on CPU
  config.model.remat = False  # rematerialise blocks (memory for compute)
  # lax.scan over depth: compile time of deep models, and on XLA:CPU a faster backward pass
  # (benchmarks/dit_step.py: the demo's DiT step 0.553 s scanned, 0.714 s unrolled).
  config.model.scan_blocks = demo
  # Each token draws its patch plus `output_overlap` pixels around it, cross-faded with its
  # neighbours (dit.fold_patches): with 16×16 patches an undertrained DiT otherwise draws a
  # mosaic with a step at every patch border. 0 = DiT's unpatchify (the default's 8×8 patches).
  config.model.output_overlap = 4 if small else 0
  # σ (pixels) of Gaussian-blurred copies of the landmark image given to the DiT as extra
  # input channels (train/dit.py landmark_fields); () = the landmark image alone (the paper).
  config.model.landmark_blur = (6.0, 16.0) if small else ()
  config.model.num_real = config_dict.placeholder(int)

  config.diffusion = config_dict.ConfigDict()
  config.diffusion.schedule = "cosine"  # cosine | linear
  config.diffusion.timesteps = 1000
  # v | eps | x0. The demo predicts x0: with 16×16 patches each token outputs 768 values from
  # a 192-wide model, too narrow to carry the per-pixel noise an ε or v target contains, while
  # clean faces lie on a low-dimensional manifold (Li & He 2025, "Back to Basics: Let
  # Denoising Generative Models Denoise"). DiT-B/8 (768 wide, 192 values per patch) keeps the
  # paper's v-prediction.
  config.diffusion.prediction = "x0" if small else "v"
  # none | min_snr | snr | v ('v' on an x0 prediction = JiT's x-prediction + v-loss, capped at
  # γ; on the demo it measured worse: 22% top-1 at step 1,000 with γ = 100 against 57% with
  # none, both with identity weight 0.2 on t ≤ 500).
  config.diffusion.weighting = "none"
  config.diffusion.snr_gamma = 5.0  # γ: cap of 'v', γ of 'min_snr'
  config.diffusion.cond_drop = 0.1  # row → zero vector (classifier-free guidance)
  config.diffusion.landmark_drop = 0.0
  # ‖f_FR(x̂0) − w‖², 0 to disable. Larger weights buy identity at the cost of the image: on
  # the demo, 0.2 on t ≤ 500 reached 71.5% top-1 at step 1,000 with samples that are
  # identity-coloured textures that fool the FR network, not faces (README "Stage 2").
  config.diffusion.id_loss_weight = 0.05
  config.diffusion.id_loss_max_t = 300  # identity loss only on t ≤ this

  steps = 4 if tiny else (1_800 if demo else 200_000)
  config.optim = config_dict.ConfigDict()
  config.optim.name = "adamw"
  config.optim.lr = 3e-4 if small else 1e-4
  config.optim.weight_decay = 0.0
  config.optim.schedule = "constant"
  config.optim.warmup_steps = 0 if tiny else (100 if demo else 5_000)
  config.optim.grad_clip_norm = 1.0

  config.train = config_dict.ConfigDict()
  config.train.num_steps = steps
  config.train.seed = 0
  config.train.log_every = 2 if tiny else (50 if demo else 100)
  config.train.checkpoint_every = 2 if tiny else (900 if demo else 5_000)
  config.train.keep_checkpoints = 3
  config.train.async_checkpoint = True
  config.train.ema_decay = 0.999 if small else 0.9999
  config.train.ema_warmup = True  # decay min(ema_decay, (1 + t) / (10 + t))
  config.train.profile_steps = ()

  config.sample = config_dict.ConfigDict()
  # 0: only at the end (the demo: a mid-run sheet and evaluations would cost minutes of its 30).
  config.sample.every = 0 if small else 10_000
  config.sample.num_steps = 2 if tiny else 50  # DDIM steps
  # η = 1 (DDPM-like noise at every step) gives the demo's young model cleaner faces and
  # better identity than deterministic DDIM: 91.0% top-1 against 87.0% on one checkpoint of
  # an earlier demo model (before `model.landmark_blur`).
  config.sample.eta = 1.0 if small else 0.0
  config.sample.spacing = "trailing"  # leading | trailing | linspace
  config.sample.guidance = 4.0
  # Guide only at timesteps t_lo ≤ t ≤ t_hi, conditional elsewhere (Kynkäänniemi et al.
  # 2024); None = every step, as the paper. The demo's (150, 880) is σ ∈ (0.25, 5.3] on the
  # cosine schedule, about EDM2's interval: on an earlier demo checkpoint it lifted top-1 at
  # 4.0 from 70.5% to 88.5% and removed the repeated eye-like texture that guidance at t < 150
  # paints.
  config.sample.guidance_interval = (150, 880) if small else config_dict.placeholder(tuple)
  # φ of Lin et al. 2023 (diffusers' guidance_rescale): pulls the guided prediction's spread
  # back to the conditional one's, against over-saturation; 0 = off, the paper.
  config.sample.guidance_rescale = 0.7 if small else 0.0
  # s_p ≥ 0 (0 = off, the paper): on the guided steps, also push each prediction away from
  # the same row drawn with the data's typical landmark image (the sheet's first column), by
  # s_p · (conditional − typical-pose). A negative condition with its own scale; it costs a
  # third batch per step.
  config.sample.pose_guidance = 0.0
  # Extra scales, at the end of training only: a sheet and the identity metrics each
  # (`guidance_sweep/*`). A young model such as the demo's draws cleaner, better identified
  # faces below the paper's 4.0, which oversaturates it.
  config.sample.guidance_sweep = (1.0,) if small else ()
  config.sample.seed = 0
  config.sample.sheet_identities = 2 if tiny else 8  # sample sheet rows
  config.sample.sheet_landmarks = 2 if tiny else 6  # sample sheet columns (landmark sets)
  config.sample.eval_identities = 4 if tiny else 200  # identity-consistency evaluation
  config.sample.batch_size = 4 if tiny else 50
  # Landmark following (`landmarks/*`): rows drawn with their landmark set moved by ±shift px
  # (same noise); the faces' measured displacement / the dots' (1 = follows, 0 = ignores).
  config.sample.follow_shift = 8.0  # 0 = off
  config.sample.follow_identities = 2 if tiny else (25 if demo else 100)
  return config
