"""The RL loop, shared by every method (``stp.methods``): rollout -> rewards -> advantages -> scoring -> mu updates ->
metrics -> checkpoint. The method (``--method``: GRPO with the stp, elbo or d1 estimator, DiFFPO) decides what the
rollout starts from, what is scored once per rollout (old / reference log-probs) and the loss; this file knows no
method by name; an offline method (``Method.supplies_batches``, e.g. dTRPO on preference pairs) supplies each batch
itself instead of a rollout, and scoring and updates run on it unchanged. Shapes: P prompts per step (p on this
process), G completions each, B = p * G samples here, Lp prompt length, L = rollout.gen_length.

Each rollout is reused for mu = ``grpo.num_iterations`` optimizer steps. One optimizer step ("step" everywhere:
metrics, checkpoints, ``grpo.max_steps``) is one inner iteration; rollout ``r = step // mu`` serves steps
``r * mu .. r * mu + mu - 1``. Advantages: ``(R - mean_group(R)) / (std_group(R) + 1e-4)`` (``grpo.scale_rewards``
false: ``R - mean``, as d1). The loss is the mean over every loss token of the step: each micro-batch's token-mean
loss is weighted by its share of the step's loss tokens on all processes (``_token_weights``), so the update does not
depend on how samples are split across processes and micro-batches; a method whose loss is not a token mean over
``stp.likelihood.valid_lengths`` sets ``token_level_loss = False`` and gets the plain mean of its micro-batch losses.

Randomness. Nothing reads a global RNG in the loop: the data order of epoch e is a permutation from
``derive_seed(run.seed, "data", e)``, rollout r samples with noise seed ``derive_seed(run.seed, "rollout", r)`` and
scores with mask seed ``derive_seed(run.seed, "masks", r)`` (inner iteration ``it`` is the mask counter's iteration),
and every sample is keyed by its index in the step (``sample_ids``), so the completions of a sample do not depend on
how prompts are split across processes. The global RNG states (python, numpy, torch: LoRA dropout uses torch's) are
saved in every checkpoint anyway and restored on resume (``stp.checkpoint``).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stp import checkpoint, data_order, fsdp, metrics, policy
from stp.checkpoint import SavedRollout, last_checkpoint
from stp.config import ConfigError, TrainConfig
from stp.loss import RolloutBatch, group_advantages
from stp.metrics import TIMING_KEYS, read_metrics
from stp.seeds import derive_seed

__all__ = ["train", "derive_seed", "TrainingDiverged", "NoLearningSignal", "TIMING_KEYS", "last_checkpoint",
           "read_metrics"]


def _token_weights(completion_ids: torch.Tensor, eos: int, n_micro: int, accelerator) -> torch.Tensor:
    """[n_micro] float32: each micro-batch's loss tokens (``stp.likelihood.valid_lengths``, at least 1 as in
    ``stp.loss.grpo_loss``) over the step's loss tokens on all processes."""
    from stp.likelihood import valid_lengths

    counts = valid_lengths(completion_ids, eos).view(n_micro, -1).sum(1).clamp(min=1).float()  # [n_micro]
    total = accelerator.reduce(counts.sum(), reduction="sum")
    return counts / total


class TrainingDiverged(RuntimeError):
    """``run.max_nan_steps`` consecutive non-finite losses: the run stopped (metrics and a checkpoint are written)."""


class NoLearningSignal(TrainingDiverged):
    """``run.max_no_signal_steps`` optimizer steps in a row whose rollouts carried no signal: the run stopped
    (metrics and a checkpoint are written)."""


NO_SIGNAL_WARN = 5  # optimizer steps in a row without signal before the warning


def _no_signal_message(steps: int, rm: dict, limit: int) -> str:
    stop = (f"the run stops after run.max_no_signal_steps = {limit} such steps in a row" if limit else
            "run.max_no_signal_steps = 0: the run goes on")
    return (f"no learning signal for {steps} steps: in every group all completions got the same reward (last "
            f"rollout: reward mean {rm['reward_mean']:.3f}, std {rm['reward_std']:.3f}), so every advantage is 0 "
            f"and nothing but the KL term moves the policy. The task is too hard (reward always 0: the model never "
            f"writes what the reward reads) or too easy (always the maximum) for this model: check the reward "
            f"function on a few of its completions, raise rollout.temperature or grpo.num_generations, or start "
            f"from a stronger model; {stop}")


def _supplied_batch(method, lm, r: int, cfg: TrainConfig, accelerator, loss_module, ref_context) -> SavedRollout:
    """Batch r of a method that supplies its own (``Method.supplies_batches``), scored like a rollout."""
    t0 = time.time()
    batch, extra = method.next_batch(r, rank=accelerator.process_index, world=accelerator.num_processes,
                                     device=accelerator.device)
    t_batch = time.time() - t0
    t0 = time.time()
    mask_seed = derive_seed(cfg.run.seed, "masks", r)
    fsdp.unshard_all(accelerator, loss_module)
    lm.train()
    with accelerator.autocast():
        scores = method.score(lm, batch, seed=mask_seed, num_iterations=cfg.grpo.num_iterations,
                              ref_context=ref_context)  # {name: [mu, B, ...]}
    fsdp.reshard_all(accelerator, loss_module)
    rm = {"reward_mean": 0.0, "nfe": 0.0, **extra, "time_rollout": t_batch, "time_scoring": time.time() - t0,
          "rollout_tokens_per_s": 0.0}
    return SavedRollout(index=r, batch=batch, scores=scores, mask_seed=mask_seed, metrics=rm)


def train(config: TrainConfig, *, progress: bool = False, reward_funcs=None, reward_weights=None,
          train_dataset=None, eval_dataset=None) -> dict[str, Any]:
    """Run the configured method; returns the summary (also written to summary.json).

    ``reward_funcs`` (TRL's form ``fn(completions, **columns) -> list[float | None]``), ``reward_weights``,
    ``train_dataset`` and ``eval_dataset`` (a ``datasets.Dataset`` or a list of dicts with a ``prompt`` column)
    replace the configured task's rewards and data (``stp.data_order.custom_task``; ``stp.Trainer`` is the same).

    Raises ConfigError / DataError before any model loads for bad settings or data, and TrainingDiverged after
    ``run.max_nan_steps`` non-finite losses in a row. On SIGINT it saves a checkpoint and returns the summary with
    ``interrupted: True``."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    from stp import models
    from stp.methods import get_method
    from stp.sampler import generate
    from stp.tasks import get_task

    cfg, t_start = config, time.time()
    cfg.check_environment()
    m, ro, g, run = cfg.model, cfg.rollout, cfg.grpo, cfg.run
    accelerator = Accelerator(cpu=run.device == "cpu", mixed_precision=run.mixed_precision)
    fsdp.check(accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    # The only global-RNG consumer in the loop is dropout (LoRA dropout); seed it per process from the config.
    global_seed = derive_seed(run.seed, "global-rng", rank)
    random.seed(global_seed)
    np.random.seed(global_seed)
    torch.manual_seed(global_seed)
    if g.prompts_per_step % world:
        raise ConfigError.bad_value("grpo.prompts_per_step", g.prompts_per_step,
                                    f"a multiple of the number of processes ({world}): prompts are split by rank")
    local_prompts, mu, rep = g.prompts_per_step // world, g.num_iterations, g.num_generations
    if (local_prompts * rep) % g.gradient_accumulation_steps:
        raise ConfigError.bad_value("grpo.gradient_accumulation_steps", g.gradient_accumulation_steps,
                                    f"a divisor of the samples per process ({local_prompts * rep})")
    out = Path(run.output_dir)
    resume_from = checkpoint.find_resume(out, run.resume, accelerator.is_main_process)

    # ---- data (before the model: bad data fails fast)
    custom = data_order.custom_task(cfg, reward_funcs, reward_weights, train_dataset, eval_dataset)
    if custom is None:
        train_rows, heldout = data_order.load_data(cfg, get_task(run.task, d1_compat=run.d1_compat))
    else:
        _, train_rows, heldout = custom
    order = data_order.DataOrder(len(train_rows), run.seed)

    # ---- model: the method prepares with the base (e.g. builds priors), then LoRA; reference = adapter disabled
    dtype = None if m.dtype == "auto" else getattr(torch, m.dtype)
    lm = models.load(policy.resolve_model(cfg, accelerator), dtype=dtype, device=accelerator.device,
                     attn_implementation=m.attn_implementation)
    if lm.tokenizer is None:
        raise ValueError(f"model {m.name_or_path!r} has no tokenizer: prompts cannot be rendered")
    task = data_order.task_for(cfg) if custom is None else custom[0]
    tok, eos, pad = lm.tokenizer, lm.eos_token_id, lm.pad_token_id
    text_of = data_order.PromptTexts(task, train_rows, tok)  # example index -> prompt text (cached)

    method = get_method(cfg.method)(cfg)
    show = progress and accelerator.is_main_process  # bars: priors, held-out evaluations, the steps
    from stp.prior import build_progress

    run_idx = order.take(0, -(-g.max_steps // mu) * g.prompts_per_step)
    method.task, method.rows = task, [train_rows[i] for i in run_idx]  # the run's rewards and examples (dTRPO's pairs)
    with build_progress(show):
        method.prepare(lm, [text_of(i) for i in run_idx], accelerator)
    ref_context = policy.setup_trainable(lm, cfg, dtype, accelerator.device)
    params = list(checkpoint.trainable(lm).values())
    # The model's group first; a method's own trainable modules (stp.methods.base) add theirs after it.
    optimizer = torch.optim.AdamW([{"params": params}, *method.optimizer_groups()], lr=g.learning_rate,
                                  betas=(g.adam_beta1, g.adam_beta2), eps=g.adam_epsilon,
                                  weight_decay=g.weight_decay)
    scheduler = get_scheduler(g.lr_scheduler_type, optimizer, num_warmup_steps=g.warmup_steps,
                              num_training_steps=g.max_steps)
    # The scheduler stays unprepared: accelerate's wrapper would step it once per process per optimizer step.
    loss_module, optimizer = accelerator.prepare(policy.PolicyLoss(lm, method), optimizer)
    if fsdp.is_sharded(loss_module):  # fully_shard replaced the parameters by sharded ones
        params = list(checkpoint.trainable(lm).values())

    # ---- start or resume (a mid-rollout checkpoint brings that rollout back: `rollout`)
    step, rollout, state = checkpoint.start_or_resume(out, cfg, resume_from, lm=lm, optimizer=optimizer,
                                                      scheduler=scheduler, accelerator=accelerator,
                                                      modules=method.trainable_modules())
    wall_before = state["wall_seconds"]  # earlier processes of this run
    if resume_from is None and run.eval_examples:
        with fsdp.full_parameters(accelerator, loss_module):  # every process takes part in the gather
            if accelerator.is_main_process:
                state["eval_before"] = metrics.evaluate_heldout(lm, task, heldout, cfg, progress=show,
                                                                **method.eval_kwargs())
    report_to = "none" if run.report_to == "tensorboard" and not run.tensorboard else run.report_to
    log = metrics.MetricsLog(out, step, report_to, metrics.flat_config(cfg)) if accelerator.is_main_process else None
    if log is not None and resume_from is None:
        log.heldout(state["eval_before"], 0)
        metrics.record_heldout(out, 0, state["eval_before"])
    bar = None
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=g.max_steps, initial=step, desc=f"RL {cfg.preset} ({cfg.method})", unit="step",
                   dynamic_ncols=True)
    t_segment = time.time()
    interrupted, diverged = False, False
    if run.max_no_signal_steps < 0:
        raise ConfigError.bad_value("run.max_no_signal_steps", run.max_no_signal_steps, "an integer >= 0")
    starved = False
    state.setdefault("no_signal_streak", 0)  # steps in a row whose rollout had no signal (checkpointed; older: 0)
    with checkpoint.StopFlag() as stop:
        while step < g.max_steps:
            r, it = divmod(step, mu)

            if method.supplies_batches and (rollout is None or rollout.index != r):
                # ================= an offline method's batch r instead of a rollout (method.next_batch)
                rollout = _supplied_batch(method, lm, r, cfg, accelerator, loss_module, ref_context)
            if rollout is None or rollout.index != r:
                # ================= rollout r: P prompts x G completions, split across processes by rank
                t0 = time.time()
                idx = order.take(r * g.prompts_per_step, g.prompts_per_step)  # global example indices [P]
                texts = [text_of(i) for i in idx]
                ids_all, attn_all = data_order.encode_prompts(tok, texts, pad, ro.max_prompt_length)  # [P, Lp]
                lo, hi = rank * local_prompts, (rank + 1) * local_prompts
                prompt_ids = ids_all[lo:hi].repeat_interleave(rep, 0).to(accelerator.device)  # [B, Lp]
                prompt_mask = attn_all[lo:hi].repeat_interleave(rep, 0).to(accelerator.device)  # [B, Lp]
                sample_ids = torch.arange(lo * rep, hi * rep, device=accelerator.device)  # [B] index in the step
                fsdp.unshard_all(accelerator, loss_module)  # whole weights for rollout and scoring (stp.fsdp)
                prior = method.prior([texts[j] for j in range(lo, hi) for _ in range(rep)], ro.gen_length,
                                     accelerator.device)  # anchors [B, L] or None
                lm.eval()
                with accelerator.autocast():
                    gen = generate(lm, prompt_ids, attention_mask=prompt_mask, gen_length=ro.gen_length,
                                   block_length=ro.block_length, steps=ro.steps, temperature=ro.temperature,
                                   remasking=ro.remasking, prior=prior, early_stop=ro.early_stop,
                                   seed=derive_seed(run.seed, "rollout", r), sample_ids=sample_ids,
                                   cfg_scale=ro.cfg_scale, confidence_threshold=ro.confidence_threshold, cache=ro.cache,
                                   decoder=ro.decoder_rule(),
                                   record_logprobs=method.rollout.behaviour_logprobs, backend=run.backend,
                                   **method.sampler_kwargs(prompt_ids, sample_ids, attention_mask=prompt_mask,
                                                           seed=derive_seed(run.seed, "rollout", r)))
                completions = gen.completions  # [B, L]
                t_rollout = time.time() - t0

                # ================= scoring: rewards -> advantages -> the method's scores for all mu iterations
                t0 = time.time()
                texts_out = data_order.decode(tok, completions.cpu(), eos)
                examples = [train_rows[idx[j]] for j in range(lo, hi) for _ in range(rep)]
                fn_names, weights = task.reward_names(), task.reward_weights()
                fn_rewards = torch.tensor(task.batch_rewards(texts_out, examples,
                                                             completion_ids=data_order.until_eos(completions, eos)),
                                          dtype=torch.float32, device=accelerator.device)  # [B, F], NaN = None
                extra = method.extra_rewards(gen)  # the method's reward terms {name: [B]}, e.g. an NFE penalty
                if extra:
                    fn_names, weights = fn_names + list(extra), (*weights, *(1.0 for _ in extra))
                    fn_rewards = torch.cat([fn_rewards, torch.stack([v.float() for v in extra.values()], 1)], 1)
                totals = metrics.total_reward(fn_rewards, weights).view(-1, rep)  # [p, G]
                advantages = group_advantages(totals.reshape(-1), rep, scale_rewards=g.scale_rewards)  # [B]
                spread = accelerator.reduce((totals.amax(1) > totals.amin(1)).float().sum(), reduction="sum")
                batch = RolloutBatch(prompt_ids=prompt_ids, prompt_attention_mask=prompt_mask,
                                     completion_ids=completions, advantages=advantages, sample_ids=sample_ids,
                                     anchors=None if prior is None else prior.mask, commit_step=gen.commit_step,
                                     behaviour_logprobs=gen.behaviour_logprobs)
                mask_seed = derive_seed(run.seed, "masks", r)
                lm.train()
                with accelerator.autocast():
                    scores = method.score(lm, batch, seed=mask_seed, num_iterations=mu,
                                          ref_context=ref_context)  # {name: [mu, B, ...]}
                fsdp.reshard_all(accelerator, loss_module)
                t_scoring = time.time() - t0
                rm = metrics.rollout_metrics(accelerator, fn_names, fn_rewards, gen, completions, eos, ro.gen_length,
                                             t_rollout, t_scoring, state, weights=weights)
                rm["groups_with_signal"] = spread.item() / g.prompts_per_step  # groups whose rewards differ
                rollout = SavedRollout(index=r, batch=batch, scores=scores, mask_seed=mask_seed, metrics=rm)

            # ================= inner iteration it: the method's loss with grad, micro-batched, one optimizer step
            t0 = time.time()
            lm.train()
            b = rollout.batch
            n_micro = g.gradient_accumulation_steps
            size = b.completion_ids.shape[0] // n_micro
            optimizer.zero_grad(set_to_none=True)
            losses, parts = [], {k: [] for k in method.loss_metrics}
            # Token-level losses are means over each micro-batch's loss tokens; weighted by their share of the
            # step's tokens (all processes), the update is the mean over every token of the step however samples
            # are split across processes and micro-batches (gradients are averaged over processes, hence * world).
            weights = _token_weights(b.completion_ids, eos, n_micro, accelerator) if (
                method.token_level_loss and (world > 1 or n_micro > 1)) else None
            for k in range(n_micro):
                sl = slice(k * size, (k + 1) * size)
                sync = contextlib.nullcontext() if k == n_micro - 1 else accelerator.no_sync(loss_module)
                with sync:
                    loss, lm_metrics = loss_module(b.slice(sl), {n: v[:, sl] for n, v in rollout.scores.items()},
                                                   seed=rollout.mask_seed, iteration=it)
                    accelerator.backward(loss / n_micro if weights is None else loss * (weights[k] * world))
                losses.append(loss.detach())
                for name in parts:
                    parts[name].append(lm_metrics[name])
            if weights is None:
                stats = torch.stack([torch.stack(losses).mean()] + [torch.stack(v).mean() for v in parts.values()])
                stats = accelerator.reduce(stats.float(), reduction="mean")  # NaN anywhere -> NaN on all ranks
            else:  # token-weighted over micro-batches and processes, as the update
                stats = torch.stack([(torch.stack(v).float() * weights).sum() for v in [losses, *parts.values()]])
                stats = accelerator.reduce(stats, reduction="sum")
            loss_v, *part_v = stats.tolist()
            grad_norm = None
            skipped = not math.isfinite(loss_v)
            if not skipped and g.max_grad_norm > 0:
                # one norm over the model's and the method's own parameters (e.g. DiFFPO's controller)
                grad_norm = float(accelerator.clip_grad_norm_(
                    params + [q for mod in method.trainable_modules().values() for q in mod.parameters()],
                    g.max_grad_norm))
                skipped = not math.isfinite(grad_norm)
            if skipped:
                optimizer.zero_grad(set_to_none=True)
                state["nan_streak"] += 1
            else:
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state["nan_streak"] = 0
            t_update = time.time() - t0
            step += 1

            # ================= metrics
            row = metrics.step_row(step, r, it, (r * g.prompts_per_step) // order.n, rollout.metrics, loss_v,
                                   dict(zip(parts, part_v)), grad_norm, scheduler.get_last_lr()[0], skipped,
                                   t_update, mu, g.samples_per_step * ro.gen_length)
            if run.eval_every and step % run.eval_every == 0 and step < g.max_steps:
                with fsdp.full_parameters(accelerator, loss_module):
                    if accelerator.is_main_process:
                        ev = metrics.evaluate_heldout(lm, task, heldout, cfg, progress=show,
                                                      **method.eval_kwargs())
                        row.update(metrics.eval_columns(ev))
                        metrics.record_heldout(out, step, ev)
            if log is not None:
                if skipped:
                    (print if bar is None else bar.write)(
                        f"stp.train: step {step}: non-finite loss or gradient ({loss_v}, grad norm {grad_norm}); "
                        f"update skipped ({state['nan_streak']} in a row, limit {run.max_nan_steps})", file=sys.stderr)
                log.write(row, jsonl=step % run.log_every == 0 or step == g.max_steps or skipped)
                if bar is not None:
                    rm = rollout.metrics
                    bar.set_postfix(reward=f"{rm['reward_mean']:.3f}", loss=f"{loss_v:.4f}", nfe=f"{rm['nfe']:.1f}")
                    bar.update(1)

            # ================= checkpoint / stop
            flag = torch.tensor([1.0 if stop.set else 0.0], device=accelerator.device)
            interrupted = bool(accelerator.reduce(flag, reduction="sum").item() > 0)
            diverged = state["nan_streak"] >= run.max_nan_steps
            no_signal = state["no_signal_streak"] + 1 if rollout.metrics.get("groups_with_signal", 1.0) == 0 else 0
            state["no_signal_streak"] = no_signal
            if no_signal == min(NO_SIGNAL_WARN, run.max_no_signal_steps or NO_SIGNAL_WARN) and log is not None:
                (print if bar is None else bar.write)(  # bar.write: on its own line, not the bar's
                    f"stp.train: warning: step {step}: "
                    f"{_no_signal_message(no_signal, rollout.metrics, run.max_no_signal_steps)}", file=sys.stderr)
            if run.max_no_signal_steps and no_signal >= run.max_no_signal_steps:
                diverged, starved = True, True
            done = step == g.max_steps
            if (run.save_every and step % run.save_every == 0) or done or interrupted or diverged:
                state["train_seconds"] += time.time() - t_segment
                t_segment = time.time()
                state["wall_seconds"] = wall_before + time.time() - t_start
                checkpoint.save_checkpoint(out, step, lm=lm, optimizer=optimizer, scheduler=scheduler, state=state,
                                           rollout=rollout if (step % mu and not done) else None,
                                           accelerator=accelerator, modules=method.trainable_modules())
            if interrupted or diverged:
                break
    if bar is not None:
        bar.close()
    state["train_seconds"] += time.time() - t_segment

    # ---- the end: held-out evaluation, plot, summary, adapter
    summary: dict[str, Any] = {}
    lora_state = fsdp.full_lora_state(lm.model, loss_module) if m.use_lora else None  # whole under FSDP, else None
    fsdp.unshard_all(accelerator, loss_module)  # the final evaluation reads whole weights
    if accelerator.is_main_process:
        after = (metrics.evaluate_heldout(lm, task, heldout, cfg, progress=show, **method.eval_kwargs())
                 if not (interrupted or diverged) else None)
        log.heldout(after, step)
        metrics.record_heldout(out, step, after)
        summary = metrics.write_summary(out, cfg, method, state, after, step=step, heldout=len(heldout),
                                        wall_seconds=wall_before + time.time() - t_start, interrupted=interrupted,
                                        diverged=diverged and not starved, world=world,
                                        task=None if custom is None else "own: " + ", ".join(task.reward_names()))
        if starved:  # stopped for want of signal, not diverged: say which in summary.json
            from stp.files import write_atomic

            summary["stopped_no_signal"] = True
            write_atomic(out / "summary.json", (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
        if m.use_lora and not (interrupted or diverged):
            # adapter_model.safetensors + adapter_config.json, which then names the base the run trained from
            lm.model.save_pretrained(str(out / "adapter"), state_dict=lora_state)
            from stp.export import record_adapter_base

            record_adapter_base(out / "adapter", m.name_or_path)
        if not (interrupted or diverged):
            method.save_artifacts(out)  # e.g. DiFFPO's controller, beside the adapter
        log.close()
    fsdp.reshard_all(accelerator, loss_module)
    accelerator.wait_for_everyone()
    if starved:
        raise NoLearningSignal(f"{_no_signal_message(no_signal, rollout.metrics, run.max_no_signal_steps)}; "
                               f"stopped at step {step}, checkpoint and metrics in {out}")
    if diverged:
        raise TrainingDiverged(f"{run.max_nan_steps} consecutive non-finite losses (run.max_nan_steps); stopped at "
                               f"step {step}, checkpoint and metrics in {out}")
    return summary
