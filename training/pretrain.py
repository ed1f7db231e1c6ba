"""Pre-train an AIM v1 trunk: `python training/pretrain.py --config training/configs/aim-debug.yaml --data DIR`.

Multi-process: `torchrun --nproc_per_node N training/pretrain.py ...` (add --nnodes/--node_rank/--rdzv_endpoint for
several nodes). Read top to bottom: config -> model -> data -> loop -> checkpoint -> export. `train(cfg)` is the
importable entry point. The recipe (AIM_FACTS §7): per-image prefix length in [1, N-1], prefix-causal trunk,
MLP pixel head on the post-trunk-norm tokens, next-patch MSE on per-patch-normalised pixels outside the prefix,
AdamW (0.9, 0.95) wd 0.05, clip 1.0, 2.5 % linear warmup then cosine to 0, bf16 autocast.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import `training` from the repository root, not from training/
    _here, _root = str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])
    sys.path[:] = [p for p in sys.path if p not in ("", _here)]
    sys.path.insert(0, _root)

import contextlib
import json
import logging
import math
import os
import signal
import tarfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from aimcore.flops import count_flops
from training import distributed as D
from training.augment import AugmentConfig
from training.checkpointing import (
    CheckpointManager,
    capture_rng,
    export_trunk,
    full_model_state,
    restore_rng,
)
from training.config import ConfigError, TrainConfig, load_config, run_identity_differences
from training.data import StreamPosition, TrainBatches, ValBatches, make_train_loader, open_data
from training.decoder import PretrainModel, build_pretrain_model
from training.logging_utils import MetricsSink, device_peak_flops, setup_logging
from training.loss import pixel_loss, pixel_loss_terms
from training.masking import build_attention_mask
from training.optim import build_optimizer, lr_at, set_lr

logger = logging.getLogger("training.pretrain")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Progress:
    """Counters saved in every checkpoint; `samples_seen` is the data position."""

    step: int = 0
    samples_seen: int = 0
    skipped_images: int = 0
    last_val_loss: float | None = None
    last_val_step: int = -1
    last_loss: float | None = None
    knn_history: list[list[float]] = field(default_factory=list)  # [step, val_loss, knn_top1] per k-NN evaluation


class NonFiniteLossError(RuntimeError):
    pass


class TooMuchBadDataError(RuntimeError):
    """More unreadable samples than data.max_bad_fraction allows."""


BAD_DATA_GRACE = 20  # bad samples tolerated whatever the fraction, so a small run is not stopped by a handful


class Trainer:
    def __init__(self, cfg: TrainConfig, env: D.DistEnv) -> None:
        self.cfg, self.env = cfg, env
        cfg.check_runtime(env.world_size, env.device.type)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        self.run_dir = Path(cfg.checkpoint.dir)
        self.aim_cfg = cfg.aim_config()
        self.num_tokens, self.patch = self.aim_cfg.num_patches, self.aim_cfg.patch_size
        self.accum = cfg.accumulation(env.world_size)
        self.global_batch = cfg.global_batch(env.world_size)
        self.autocast_dtype = DTYPES[cfg.train.precision]
        use_flex = cfg.model.attention == "flex" or (cfg.model.attention == "auto" and env.device.type == "cuda")
        self.kernel = "flex" if use_flex else "sdpa"

        # ----- model, wrappers, optimizer -----
        self.model: PretrainModel = build_pretrain_model(
            self.aim_cfg,
            decoder_style=cfg.model.decoder_block,
            decoder_eps=cfg.model.decoder_norm_eps,
            seed=cfg.train.seed,
        )
        self.wrapped = D.wrap_model(
            self.model,
            self.model.blocks(),
            env,
            ac=cfg.dist.activation_checkpointing,
            compile=cfg.dist.compile,
            reshard_after_forward=cfg.dist.fsdp_reshard_after_forward,
        )
        o = cfg.optim
        self.optimizer = build_optimizer(
            self.model, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
            fused=env.device.type == "cuda",
        )  # fmt: skip
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.precision == "fp16")

        # ----- checkpoints and resume -----
        self.ckpt = CheckpointManager(
            self.run_dir, keep_last=cfg.checkpoint.keep_last, keep_best=cfg.checkpoint.keep_best, is_main=env.is_main
        )
        self.ckpt.remove_partial()
        D.barrier()
        self.progress = Progress()
        self._resume()

        # ----- data -----
        if not cfg.data.path:
            raise ConfigError("data.path is empty: pass --data <folder | list.txt | shards.tar>")
        d = cfg.data
        try:
            train_source, val_source = open_data(
                d.path, d.val_path, fmt=d.format, val_fraction=d.val_fraction, seed=cfg.train.seed,
                shuffle_window=d.shuffle_window, open_shards=d.open_shards, cache_dir=d.cache_dir,
            )  # fmt: skip
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise ConfigError(f"cannot read the data: {exc}") from exc
        aug = AugmentConfig(self.aim_cfg.img_size, d.crop_scale, d.crop_ratio, d.hflip_p, d.color_jitter,
                            d.color_jitter_p)  # fmt: skip
        position = StreamPosition(self.progress.samples_seen, env.world_size, env.rank, cfg.train.micro_batch_size)
        self.train_data = TrainBatches(
            train_source, augment_config=aug, position=position, seed=cfg.train.seed, num_tokens=self.num_tokens,
            max_retries=d.max_retries, max_pixels=d.max_image_pixels, jpeg_draft=d.jpeg_draft,
        )  # fmt: skip
        self.train_data.log_keys = cfg.debug.log_sample_keys
        self.loader = make_train_loader(
            self.train_data, num_workers=d.num_workers, prefetch_factor=d.prefetch_factor,
            pin_memory=env.device.type == "cuda",
        )  # fmt: skip
        self._bad_images: set[str] = set()
        self.val_data = None
        if val_source is not None:
            self.val_data = ValBatches(
                val_source, img_size=self.aim_cfg.img_size, seed=cfg.train.seed, num_tokens=self.num_tokens,
                max_pixels=d.max_image_pixels, max_samples=d.val_max_samples,
            )  # fmt: skip
        self.knn = None
        if cfg.log.knn_path:
            from training.live_knn import LiveKnn

            self.knn = LiveKnn(cfg.log.knn_path, img_size=self.aim_cfg.img_size, per_class=cfg.log.knn_per_class,
                               k=cfg.log.knn_k, batch_size=cfg.train.micro_batch_size)  # fmt: skip
        logger.info(
            "%s: %d train / %d val images; %s params (trunk %s, head %s); global batch %d = %d ranks x %d x %d "
            "accumulation; attention %s; %s; strategy %s",
            self.aim_cfg.name, len(train_source), len(self.val_data or []),
            f"{sum(p.numel() for p in self.model.parameters()):,}", f"{self.model.aim.num_params():,}",
            f"{sum(p.numel() for p in self.model.decoder.parameters()):,}", self.global_batch, env.world_size,
            cfg.train.micro_batch_size, self.accum, self.kernel, cfg.train.precision, env.strategy,
        )  # fmt: skip

        # ----- metrics -----
        self.flops_per_image = count_flops(self.aim_cfg).pretrain_step
        self.peak, peak_source = device_peak_flops(env.device, self.autocast_dtype, cfg.log.peak_tflops)
        logger.info("MFU peak %.1f TFLOP/s per device (%s)", self.peak / 1e12, peak_source)
        self.sink = MetricsSink(
            self.run_dir, enabled=env.is_main, jsonl=cfg.log.jsonl, tensorboard=cfg.log.tensorboard,
            start_step=self.progress.step,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------------------------
    def _resume(self) -> None:
        choice = self.cfg.checkpoint.resume
        folder = None if choice == "never" else self.ckpt.latest() if choice == "auto" else Path(choice)
        if folder is None:
            return
        meta = CheckpointManager.load_meta(folder)
        saved = TrainConfig.from_dict(meta["config"])
        differences = run_identity_differences(saved, self.cfg)
        if differences:
            raise ConfigError(
                f"{folder} belongs to another run ({'; '.join(differences)}). Refusing to resume it: start fresh "
                "with a new --checkpoint.dir (or --checkpoint.resume never to train from scratch in this one)"
            )
        CheckpointManager.restore_model_and_optimizer(self.wrapped, self.optimizer, folder)
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.progress = Progress(**meta["progress"])
        if meta["world_size"] == self.env.world_size:
            restore_rng(meta["rng"][self.env.rank])
        else:
            logger.warning(
                "resuming a %d-process run with %d processes: data position kept (sample %d), per-rank RNG states "
                "not restored (no training randomness depends on them)",
                meta["world_size"], self.env.world_size, self.progress.samples_seen,
            )  # fmt: skip
        if saved.train.steps != self.cfg.train.steps:
            logger.warning("train.steps changed from %s to %d: the schedule changes from here",
                           saved.train.steps, self.cfg.train.steps)  # fmt: skip
        logger.info("resumed from %s at step %d (sample %d)", folder, self.progress.step, self.progress.samples_seen)

    def _save(self) -> None:
        """Start an asynchronous sharded save of this step (every rank; training goes on while it is written)."""
        step = self.progress.step
        if self.val_data is not None and self.progress.last_val_step != step:
            self.evaluate()
        meta = {
            "format": "aim-pretrain-dcp",
            "version": 2,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": D.gather_objects(capture_rng()),
            "world_size": self.env.world_size,
            "progress": asdict(self.progress),
            "config": self.cfg.to_dict(),
        }
        val = self.progress.last_val_loss if self.progress.last_val_step == step else None
        kill = self.cfg.debug.sigkill_during_save_at_step == step
        self.ckpt.save_async(self.wrapped, self.optimizer, meta, step, val_loss=val, kill_mid_save=kill)
        logger.debug("checkpoint %d staged in %.3f s", step, self.ckpt.last_save["blocked_s"])

    # ------------------------------------------------------------------------------------------------------------
    def _forward_loss(self, images: torch.Tensor, prefix_lens: torch.Tensor) -> torch.Tensor:
        mask, attn_mask = build_attention_mask(prefix_lens, self.num_tokens, self.kernel)
        with torch.autocast(
            self.env.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype != torch.float32
        ):
            pred = self.wrapped(images, attn_mask)  # (B, N, P*P*3)
        return pixel_loss(pred, images, mask, self.patch)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Validation loss over the held-out images: exact global ratio (sum of errors / non-prefix patches)."""
        assert self.val_data is not None
        bs, dev = self.cfg.train.micro_batch_size, self.env.device
        totals = torch.zeros(2, dtype=torch.float64, device=dev)
        for c in range(self.val_data.num_chunks(bs, self.env.world_size)):
            chunk = self.val_data.chunk(c, bs, self.env.rank, self.env.world_size)
            weight = 1.0
            if chunk is None:  # keep FSDP's collectives in step: a dummy forward that counts for nothing
                chunk, weight = (torch.zeros(1, 3, self.aim_cfg.img_size, self.aim_cfg.img_size),
                                 torch.ones(1, dtype=torch.int64)), 0.0  # fmt: skip
            images, prefix = chunk[0].to(dev), chunk[1].to(dev)
            mask, attn_mask = build_attention_mask(prefix, self.num_tokens, self.kernel)
            with torch.autocast(dev.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype != torch.float32):
                pred = self.wrapped(images, attn_mask)
            total, count = pixel_loss_terms(pred, images, mask, self.patch)
            totals += weight * torch.stack([total, count]).double()
        D.all_reduce_sum(totals)
        loss = (totals[0] / totals[1]).item() if totals[1] > 0 else None
        self.progress.last_val_loss, self.progress.last_val_step = loss, self.progress.step
        if loss is not None:
            metrics: dict[str, Any] = {"val_loss": loss, "val_images": len(self.val_data)}
            every = self.cfg.log.knn_every
            if self.knn is not None and (not every or self.progress.step % every == 0):
                top1 = self.knn.top1(self.wrapped, self.model.aim, self.env.device, self.autocast_dtype)
                metrics["knn_top1"] = top1
                self.progress.knn_history.append([self.progress.step, loss, top1])
            self.sink.write("val", self.progress.step, metrics)
            logger.info("step %d: val loss %.5f%s", self.progress.step, loss,
                        f", k-NN top-1 {metrics['knn_top1']:.4f}" if "knn_top1" in metrics else "")  # fmt: skip
        return loss

    # ------------------------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, env, p = self.cfg, self.env, self.progress
        total = cfg.train.steps
        batches = iter(self.loader)
        interval: dict[str, float] = {"loss": 0.0, "steps": 0, "wait": 0.0, "start": time.perf_counter()}
        if p.step >= total:  # a resume of a finished run: nothing to train, no progress bar, the saved last loss
            logger.info("the run in %s is already complete at step %d of %d", self.run_dir, p.step, total)
            return self._finish(p.last_loss, already_done=True)
        bar = tqdm(total=total, initial=p.step, disable=not (env.is_main and cfg.log.progress_bar), dynamic_ncols=True)
        is_ddp = isinstance(self.wrapped, torch.nn.parallel.DistributedDataParallel)
        last_loss = math.nan
        with logging_redirect_tqdm():
            while p.step < total:
                lr = lr_at(p.step, total_steps=total, peak_lr=cfg.optim.lr, warmup_fraction=cfg.optim.warmup_fraction,
                           warmup_init_lr=cfg.optim.warmup_init_lr, end_lr=cfg.optim.end_lr)  # fmt: skip
                set_lr(self.optimizer, lr)
                step_loss = torch.zeros((), device=env.device)
                skipped = 0
                for micro in range(self.accum):
                    t0 = time.perf_counter()
                    batch = next(batches)
                    interval["wait"] += time.perf_counter() - t0
                    skipped += self._note_failures(batch["failures"])
                    if cfg.debug.log_sample_keys:
                        with open(self.run_dir / f"keys.rank{env.rank}.jsonl", "a") as fh:
                            fh.write(json.dumps({"step": p.step + 1, "keys": batch["keys"]}) + "\n")
                    images = batch["images"].to(env.device, non_blocking=True)
                    prefix = batch["prefix_lens"].to(env.device, non_blocking=True)
                    last_micro = micro == self.accum - 1
                    sync = contextlib.nullcontext() if (last_micro or not is_ddp) else self.wrapped.no_sync()
                    if env.strategy == "fsdp":
                        self.wrapped.set_requires_gradient_sync(last_micro)
                    with sync:
                        loss = self._forward_loss(images, prefix)
                        self.scaler.scale(loss / self.accum).backward()
                    step_loss += loss.detach() / self.accum
                if cfg.debug.sigkill_at_step == p.step + 1:
                    logger.warning("debug: SIGKILL in the middle of step %d", p.step + 1)
                    os.kill(os.getpid(), signal.SIGKILL)
                loss_value, grad_norm = self._optimizer_step(step_loss, skipped)
                p.step += 1
                p.samples_seen += self.global_batch
                self._check_bad_fraction()
                last_loss = p.last_loss = loss_value
                self.ckpt.poll()
                interval["loss"] += loss_value
                interval["steps"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
                if p.step % cfg.log.every == 0 or p.step == total:
                    self._log(interval, lr, grad_norm)
                if cfg.log.eval_every and p.step % cfg.log.eval_every == 0 and self.val_data is not None:
                    self.evaluate()
                if p.step % cfg.checkpoint.every == 0 or p.step == total:
                    self._save()
        bar.close()
        return self._finish(last_loss)

    def _optimizer_step(self, step_loss: torch.Tensor, skipped: int) -> tuple[float, float]:
        """All-reduce the loss (and the skipped-image count), clip, apply the NaN/inf policy, step.
        Returns (mean loss over ranks, global grad norm)."""
        reduced = D.all_reduce_sum(
            torch.stack(
                [step_loss.double(), torch.tensor(float(skipped), device=step_loss.device, dtype=torch.float64)]
            )
        )
        loss_value = float(reduced[0]) / self.env.world_size
        self.progress.skipped_images += int(reduced[1])
        self.scaler.unscale_(self.optimizer)
        clip = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self.scaler.step(self.optimizer)
        elif self.scaler.is_enabled() and math.isfinite(loss_value):
            self.scaler.step(self.optimizer)  # fp16 overflow: the scaler skips the step and lowers its scale
        else:
            step = self.progress.step + 1
            logger.error("non-finite %s at step %d (loss=%s, grad_norm=%s); nan_policy=%s",
                         "loss" if not math.isfinite(loss_value) else "gradient", step, loss_value, grad_norm,
                         self.cfg.train.nan_policy)  # fmt: skip
            if self.cfg.train.nan_policy == "stop":
                raise NonFiniteLossError(f"non-finite loss or gradient at step {step}; stopping (train.nan_policy)")
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm

    def _check_bad_fraction(self) -> None:
        p, limit = self.progress, self.cfg.data.max_bad_fraction
        if p.skipped_images > max(BAD_DATA_GRACE, limit * p.samples_seen):
            raise TooMuchBadDataError(
                f"{p.skipped_images} of {p.samples_seen} samples were unreadable, more than data.max_bad_fraction="
                f"{limit}; check the shards named in the warnings above or raise --data.max_bad_fraction"
            )

    def _note_failures(self, failures: list[tuple[str, str]]) -> int:
        """Log each unreadable image once (at warning level); every occurrence is counted."""
        for key, error in failures:
            if key not in self._bad_images:
                self._bad_images.add(key)
                logger.warning("skipping unreadable image %s (%s); a random other image takes its place", key, error)
        return len(failures)

    def _log(self, interval: dict[str, float], lr: float, grad_norm: float) -> None:
        elapsed = max(time.perf_counter() - interval["start"], 1e-9)
        images_per_s = interval["steps"] * self.global_batch / elapsed
        metrics = {
            "loss": interval["loss"] / interval["steps"],
            "lr": lr,
            "grad_norm": grad_norm,
            "images_per_s": images_per_s,
            "tokens_per_s": images_per_s * self.num_tokens,
            "mfu": self.flops_per_image * images_per_s / (self.peak * self.env.world_size),
            "samples_seen": self.progress.samples_seen,
            "skipped_images": self.progress.skipped_images,
            "data_wait_frac": interval["wait"] / elapsed,
        }
        if self.env.device.type == "cuda":
            metrics["max_mem_gib"] = torch.cuda.max_memory_allocated(self.env.device) / 2**30
        self.sink.write("train", self.progress.step, metrics)
        interval.update(loss=0.0, steps=0, wait=0.0, start=time.perf_counter())

    def _finish(self, last_loss: float | None, *, already_done: bool = False) -> dict[str, Any]:
        result: dict[str, Any] = {
            "step": self.progress.step, "samples_seen": self.progress.samples_seen, "loss": last_loss,
            "val_loss": self.progress.last_val_loss, "run_dir": str(self.run_dir), "trunk": None,
        }  # fmt: skip
        self.ckpt.wait()
        D.barrier()
        history = {int(step): (val, top1) for step, val, top1 in self.progress.knn_history}  # re-runs overwrite
        if len(history) >= 3:
            from training.probe_lib.metrics import spearman

            stats = spearman([v for v, _ in history.values()], [t for _, t in history.values()])
            result["spearman_val_loss_knn_top1"] = stats["rho"]
            self.sink.write("summary", self.progress.step, {"spearman_val_loss_knn_top1": stats["rho"],
                                                            "spearman_n": stats["n"]})  # fmt: skip
            logger.info("Spearman(val loss, k-NN top-1) over %d evaluations: rho = %.3f (the paper's finding 2: "
                        "lower loss, better features, so rho < 0)", stats["n"], stats["rho"])  # fmt: skip
        trunk_file = self.run_dir / "trunk.safetensors"
        if already_done and trunk_file.is_file():
            result["trunk"] = str(trunk_file)
        elif self.cfg.checkpoint.export:
            state = full_model_state(self.wrapped)  # collective under FSDP
            if self.env.is_main:
                provenance = {"trained_by": "training/pretrain.py", "step": self.progress.step,
                              "samples_seen": self.progress.samples_seen, "val_loss": self.progress.last_val_loss,
                              "config": self.cfg.to_dict()}  # fmt: skip
                path = export_trunk(state, self.aim_cfg, trunk_file, provenance)
                result["trunk"] = str(path)
                logger.info("exported the trunk to %s", path)
            D.barrier()
        self.sink.close()
        return result


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) a pre-training run in this process; returns a summary. Starts and ends the process group
    when launched under torchrun."""
    env = D.init_distributed(cfg.train.device, cfg.dist.strategy, cfg.dist.backend)
    try:
        return Trainer(cfg, env).fit()
    finally:
        D.shutdown()


def _pop_dry_run(argv: list[str]) -> int:
    """`--dry-run WORLD_SIZE` (not a config option): print the per-rank memory plan and exit."""
    if "--dry-run" not in argv:
        return 0
    i = argv.index("--dry-run")
    try:
        world = int(argv[i + 1])
    except (IndexError, ValueError):
        raise ConfigError("--dry-run needs the world size to plan for, e.g. --dry-run 64") from None
    del argv[i : i + 2]
    return world


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", "0"))
    setup_logging(rank)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        dry_run = _pop_dry_run(argv)
        cfg = load_config(argv)
    except (ConfigError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 2
    if dry_run:
        from training.memory_plan import format_plan, plan_memory

        logger.info("dry run: %s", format_plan(plan_memory(cfg, dry_run)))
        return 0
    try:
        result = train(cfg)
    except (ConfigError, FileNotFoundError) as exc:  # bad options or data paths: a message, not a traceback
        logger.error("%s", exc)
        return 2
    except NonFiniteLossError as exc:
        logger.error("%s", exc)
        return 3
    except TooMuchBadDataError as exc:
        logger.error("%s", exc)
        return 4
    if rank == 0:
        logger.info("done: %s", {k: v for k, v in result.items() if k != "run_dir"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
