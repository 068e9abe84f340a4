"""The settings of one adaptation run, read from YAML with command-line overrides."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..rope import parse_rope
from ..settings import DEFAULT_P, SOFTMAX, SSMAX, check_attention
from .schedule import check_schedule

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "no", "bf16", "fp16")
TEMPERATURE_INITS = ("one", "calibrate")


@dataclass
class FinetuneConfig:
    """LoRA adaptation of a pretrained checkpoint to LSSA/LSSAR (or softmax, the fair baseline)."""

    model: str = "smollm2"  # hub name, folder, .gguf file or "smollm2" (offline default)
    attention: str = "lssar"  # the attention trained *and* evaluated: re-weighting must be seen in training
    p: float = DEFAULT_P
    # LSSAR only: [[step, p], ...], piecewise linear, ending at `p` (finetune/schedule.py); None = constant p
    p_schedule: list | None = None
    # RoPE scaling set on load, trained with and kept ("yarn:2", {type: yarn, factor: 2}, "default";
    # lssa_hf.rope); None keeps the checkpoint's own
    rope: str | dict | None = None
    ssmax_length: int | None = None  # attention "ssmax": keys at which it equals softmax; None = block_size
    softmax_layers: list | None = None  # layer indices kept on softmax (a hybrid); None = every layer swapped
    softmax_heads: dict | None = None  # {layer: [query heads]} kept on softmax inside LSSA layers
    output_dir: str = "runs/adapt/lssar"
    seed: int = 0
    dtype: str = "float32"  # weights as loaded; mixed precision is `precision`

    # data: files, folders or dataset names ("name:config"); documents are packed into blocks
    train_text: list = field(default_factory=list)  # [] = built-in text (Python docs)
    eval_text: str | None = None  # None: hold out the last `validation_fraction` of the training blocks
    train_split: str = "train"  # used when a source is a dataset name
    eval_split: str = "validation"
    text_field: str = "text"
    block_size: int = 512
    validation_fraction: float = 0.05
    max_train_tokens: int | None = None
    max_eval_blocks: int = 16

    # LoRA; target_modules None = the architecture's attention projections (see lora.py)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: list | None = None
    train_norms: bool = True  # LSSA changes every layer's output statistics: let the norms follow
    train_embeddings: bool = False
    # continue a finished run: its output folder (adapter/ and finetune.json); its cost is added to this run's
    init_adapter: str | None = None
    # learned per-head multiplier of LSSA's length scale (lssa_hf.temperature), with its own LR;
    # LSSA only (turned off for attention "softmax", which has no length scale)
    head_temperature: bool = False
    temperature_lr: float = 2e-2
    # "one" (the paper's scale) or "calibrate": before training, each head's tau is set to the grid value
    # whose layer output best matches the softmax checkpoint's on calibration_blocks training blocks
    # (finetune/calibrate.py)
    temperature_init: str = "one"
    calibration_blocks: int = 2

    # attention-transfer warm start (LoLCATs-style): LoRA on q/k only, per-layer output MSE vs softmax
    warm_start: bool = False
    warm_start_steps: int = 50
    warm_start_lr: float = 1e-3
    warm_start_targets: list | None = None  # None = the architecture's q/k projections

    # loop (transformers Trainer; `accelerate launch` for several processes)
    max_steps: int = 300
    batch_size: int = 8  # per device
    grad_accum: int = 1
    lr: float = 5e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: bf16 where supported, else fp16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int = 50
    save_steps: int = 100
    save_total_limit: int | None = 2
    resume: bool = True  # continue from the newest checkpoint in output_dir if there is one
    merge: bool = False  # also write output_dir/merged: a full checkpoint that loads as LSSA
    progress: bool = True

    def __post_init__(self):
        for f in fields(self):  # YAML 1.1 reads "1e-3" as a string
            if isinstance(f.default, float) and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, float(getattr(self, f.name)))
        check_attention(self.attention)
        if self.precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {self.precision!r}: use one of {PRECISIONS}.")
        if isinstance(self.train_text, str):
            self.train_text = [self.train_text]
        if not 0 <= self.validation_fraction < 1:
            raise ValueError("validation_fraction must be in [0, 1).")
        if self.eval_text is None and self.validation_fraction == 0:
            raise ValueError("Give eval_text or a validation_fraction > 0: validation loss needs held-out text.")
        if self.head_temperature and self.attention == SOFTMAX:
            # the recipe's LSSA default meets the --attention softmax baseline: softmax has no length scale
            logger.info("head_temperature applies to LSSA only: off for the softmax baseline.")
            self.head_temperature = False
        if self.temperature_init not in TEMPERATURE_INITS:
            raise ValueError(f"Unknown temperature_init {self.temperature_init!r}: use one of {TEMPERATURE_INITS}.")
        if self.temperature_init == "calibrate" and not self.head_temperature:
            raise ValueError("temperature_init 'calibrate' sets per-head temperatures: set head_temperature: true "
                             "(and an LSSA-family attention, not softmax).")
        if self.warm_start and self.attention == SOFTMAX:
            raise ValueError("The warm start matches LSSA layers to their softmax originals: it needs attention "
                             "'lssa' or 'lssar', not 'softmax'.")
        self.p = float(self.p)
        parse_rope(self.rope)  # a bad value fails here, before any loading
        if self.attention == SSMAX and self.ssmax_length is None:
            self.ssmax_length = self.block_size
        if self.p_schedule is not None:
            if self.attention != "lssar":
                raise ValueError(f"p_schedule sets LSSAR's re-weighting power; attention {self.attention!r} has none: "
                                 "use attention 'lssar' or drop p_schedule.")
            self.p_schedule = [list(point) for point in check_schedule(self.p_schedule, self.p, self.max_steps)]

    @property
    def first_p(self) -> float:
        """The p training starts with (the schedule's first value, else ``p``)."""
        return self.p_schedule[0][1] if self.p_schedule else self.p

    @classmethod
    def from_yaml(cls, path: str | Path | None, settings: dict | None = None, **overrides) -> "FinetuneConfig":
        """The YAML file's settings (none if ``path`` is None), then the non-None ``overrides`` (command-line
        flags not given are None), then ``settings`` as given, None included (``--set p_schedule=null``)."""
        import yaml

        values = (yaml.safe_load(Path(path).read_text()) or {}) if path else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        values.update(settings or {})
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown settings {sorted(unknown)}; valid: {sorted(f.name for f in fields(cls))}.")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)
