"""The adaptation recipe: load -> swap attention -> (warm start) -> LoRA on the LM loss -> save.

Artefacts in ``output_dir``: ``adapter/`` (peft adapter + tokenizer), ``merged/`` on request (a full
checkpoint whose config.json selects LSSA), ``finetune.json`` (config, training cost, losses), and the
Trainer's ``checkpoints/`` (resumable; also ``warm_start/checkpoints/``).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..models import RESULT, drop_gguf_marker, load
from ..patching import set_attention
from .calibrate import calibrate_temperatures
from .clock import WallClock, wall_clock
from .config import FinetuneConfig
from .data import build_datasets
from .lora import add_lora, attention_targets
from .optim import AdaptTrainer
from .schedule import PowerSchedule
from .warmstart import AttentionTransferTrainer, layer_mse, qk_only, restore

def precision_flags(precision: str) -> dict:
    """TrainingArguments' bf16/fp16 for ``precision`` on this machine ("auto": the best it supports)."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "no"
    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not cuda}


def training_args(config: FinetuneConfig, folder: Path, steps: int, lr: float, warmup: int):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(folder), max_steps=steps, per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size, gradient_accumulation_steps=config.grad_accum,
        learning_rate=lr, lr_scheduler_type=config.lr_scheduler, warmup_steps=warmup,
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps, logging_first_step=True,
        eval_strategy="steps" if config.eval_steps else "no", eval_steps=config.eval_steps or None,
        save_strategy="steps" if config.save_steps else "no", save_steps=config.save_steps or None,
        save_total_limit=config.save_total_limit, seed=config.seed, data_seed=config.seed,
        activation_checkpointing=config.gradient_checkpointing, report_to="none", disable_tqdm=not config.progress,
        remove_unused_columns=False, prediction_loss_only=True, dataloader_drop_last=True,
        ddp_find_unused_parameters=False, restore_callback_states_from_checkpoint=True,  # the WallClock's time
        **precision_flags(config.precision),
    )


def build_model(config: FinetuneConfig):
    """(peft model, tokenizer): the checkpoint with the configured attention and a fresh LoRA."""
    from transformers import set_seed

    model, tokenizer = load(config.model, dtype=getattr(torch, config.dtype), rope=config.rope)
    drop_gguf_marker(model)
    set_attention(model, config.attention, p=config.first_p, head_temperature=config.head_temperature,
                  ssmax_length=config.ssmax_length, softmax_layers=config.softmax_layers,
                  softmax_heads=config.softmax_heads)
    set_seed(config.seed)  # LoRA A matrices are drawn here: same init for every attention
    model = add_lora(model, config)
    if config.init_adapter:
        load_adapter_weights(model, config.init_adapter)
    if config.gradient_checkpointing:
        model.enable_input_require_grads()
    return model, tokenizer


def load_adapter_weights(model, run: str | Path) -> None:
    """Start from a finished run's adapter (LoRA, trained norms, temperatures): every tensor must fit."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    folder = Path(run) / "adapter"
    if not (folder / "adapter_config.json").exists():
        raise FileNotFoundError(f"init_adapter: no adapter in {folder}; give the output_dir of a finished "
                                "`lssa-hf finetune` run.")
    fix = ("use the same lora_r, target_modules, train_norms, train_embeddings and head_temperature as that run "
           "(its finetune.json has them).")
    try:
        result = set_peft_model_state_dict(model, load_peft_weights(str(folder)))
    except RuntimeError as error:  # tensor shapes differ
        raise ValueError(f"init_adapter {run} does not fit this LoRA: {str(error).splitlines()[1].strip()}; "
                         + fix) from error
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"init_adapter {run} does not fit this LoRA ({len(missing)} missing, "
                         f"{len(result.unexpected_keys)} unexpected tensors, e.g. "
                         f"{(missing + result.unexpected_keys)[0]}): " + fix)


def total_cost(result: dict) -> dict:
    """Steps, tokens and seconds of a finished run (a finetune.json), its warm start, temperature
    calibration and the runs it continues included; ``seconds_complete`` is False where a resume
    lost earlier time."""
    cost = {k: result[k] for k in ("steps", "tokens", "seconds")}
    # runs from before the time was checkpointed: a resumed one only knows its last process's time
    complete = result.get("seconds_complete", result.get("resumed_from") is None)
    for earlier in (result.get("warm_start") or {}, result.get("init_adapter") or {},
                    result.get("temperature_init") or {}):  # the calibration: seconds only
        for k in cost:
            cost[k] += earlier.get(k, 0)
        complete = complete and earlier.get("seconds_complete", True)
    return {**cost, "seconds_complete": complete}


def last_checkpoint(folder: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def _cost(trainer, config: FinetuneConfig) -> dict:
    world, steps, clock = trainer.args.world_size, trainer.state.global_step, wall_clock(trainer)
    return {"steps": steps, "tokens": steps * config.batch_size * config.grad_accum * world * config.block_size,
            "processes": world, "seconds": round(clock.total(), 1), "seconds_complete": clock.complete}


def _losses(trainer, key: str) -> list:
    return [{"step": e["step"], key: round(e[key], 4)} for e in trainer.state.log_history if key in e]


def calibrate(model, config: FinetuneConfig, train) -> dict:
    """Per-head temperatures from the softmax checkpoint (``calibrate_temperatures``) on the first
    ``calibration_blocks`` training blocks; the LoRA is still zero, so the model is the checkpoint."""
    ids = torch.as_tensor(train[: config.calibration_blocks]["input_ids"])
    start = time.perf_counter()
    result = calibrate_temperatures(model, ids)
    return {**result, "seconds": round(time.perf_counter() - start, 1)}


def warm_start(model, config: FinetuneConfig, train, valid, out: Path) -> dict:
    """Attention transfer on the q/k LoRA; returns its cost and the per-layer MSE before and after."""
    _, qk = attention_targets(model, config)
    folder = out / "warm_start"
    flags = qk_only(model, qk)
    before = layer_mse(model, valid)
    # no activation checkpointing here: its recomputation would run without the input-replay hooks
    args = training_args(replace(config, gradient_checkpointing=False), folder / "checkpoints",
                         config.warm_start_steps, config.warm_start_lr,
                         warmup=min(config.warmup_steps, config.warm_start_steps // 10))
    trainer = AttentionTransferTrainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
                                       temperature_lr=config.temperature_lr, callbacks=[WallClock()])
    try:
        resume = last_checkpoint(folder / "checkpoints") if config.resume else None
        trainer.train(resume_from_checkpoint=resume)
    finally:
        trainer.close()
    after = layer_mse(model, valid)
    restore(model, flags)
    result = {"targets": qk, **_cost(trainer, config),
              "layer_mse_before": [round(x, 6) for x in before], "layer_mse_after": [round(x, 6) for x in after],
              "train_loss": _losses(trainer, "loss")}
    if trainer.is_world_process_zero():
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder / "adapter")
        (folder / "warm_start.json").write_text(json.dumps(result, indent=1))
    trainer.accelerator.wait_for_everyone()
    return result


def finetune(config: FinetuneConfig) -> dict:
    """Run the recipe; returns the content of ``finetune.json`` (also written to output_dir)."""
    return adapt(config)[2]


def adapt(config: FinetuneConfig):
    """Run the recipe; returns (peft model, tokenizer, result dict)."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights
    out = Path(config.output_dir)
    model, tokenizer = build_model(config)
    train, valid = build_datasets(config, tokenizer)
    result = {"config": config.to_dict(), "train_blocks": len(train), "eval_blocks": len(valid)}
    if config.init_adapter:
        result["init_adapter"] = total_cost(json.loads((Path(config.init_adapter) / RESULT).read_text()))
    resume = last_checkpoint(out / "checkpoints") if config.resume else None
    if config.temperature_init == "calibrate" and not (resume or config.init_adapter):
        result["temperature_init"] = calibrate(model, config, train)  # (a checkpoint holds its temperatures)

    if config.warm_start:
        done = out / "warm_start" / "warm_start.json"
        if resume:  # the LM checkpoint already holds the warm-started q/k LoRA
            result["warm_start"] = json.loads(done.read_text()) if done.exists() else None
        elif config.resume and done.exists():
            set_peft_model_state_dict(model, load_peft_weights(str(out / "warm_start" / "adapter")))
            result["warm_start"] = json.loads(done.read_text())
        else:
            result["warm_start"] = warm_start(model, config, train, valid, out)

    trainer = AdaptTrainer(model=model, args=training_args(config, out / "checkpoints", config.max_steps, config.lr,
                                                           config.warmup_steps),
                           train_dataset=train, eval_dataset=valid, temperature_lr=config.temperature_lr,
                           callbacks=[WallClock()])
    if config.p_schedule:
        trainer.add_callback(PowerSchedule(config.p_schedule))  # checked by FinetuneConfig
    trainer.train(resume_from_checkpoint=resume)
    result.update(_cost(trainer, config))  # before the final evaluation: training time only
    final = trainer.evaluate()["eval_loss"]
    result.update(resumed_from=resume, eval_loss=round(final, 4), eval_ppl=round(math.exp(final), 3),
                  train_loss=_losses(trainer, "loss"), eval=_losses(trainer, "eval_loss"))
    if trainer.is_world_process_zero():
        save(model, tokenizer, out, config.merge)
        (out / RESULT).write_text(json.dumps(result, indent=1))
    trainer.accelerator.wait_for_everyone()
    return model, tokenizer, result


def save(model, tokenizer, out: Path, merge: bool) -> None:
    model.save_pretrained(out / "adapter")
    tokenizer.save_pretrained(out / "adapter")
    if merge:  # merge a copy: the peft model stays usable
        import copy

        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(out / "merged")  # config.json carries attn_implementation + lssa settings
        tokenizer.save_pretrained(out / "merged")
