"""Downstream tasks with lm-evaluation-harness, after an experience.

``ToolkitLM`` wraps the toolkit's language model (``model(x) -> (logits, aux)``, ids from the
stream's tokenizer, data/tokenizer.py) as an lm-eval model, so any lm-eval task runs on it:
``loglikelihood`` (multiple choice), ``loglikelihood_rolling`` (perplexity tasks) and a greedy
``generate_until``. Requests longer than the model's context keep their last tokens, as
lm-eval's own Hugging Face model does. The model routes over every expert (no expert mask): a
downstream task belongs to no experience.

A user's own task is a YAML file in a folder given as ``evaluation.lm_eval.include_path``
(lm-eval's ``TaskManager(include_path=...)``), e.g. a multiple-choice task over a local jsonl
(``dataset_path: json``); nothing is downloaded for it. Task names are checked before training
(``check_tasks``). lm-eval is the optional extra ``[eval]``.

lm-eval hands the model all requests of one kind at once, grouped by task; ``progress`` logs a
line through the ``lifelong_moe`` logger when a task's requests begin and every
``evaluation.lm_eval.progress_every`` requests, with the rate, so a long evaluation is visible.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lifelong_moe import names
from lifelong_moe.errors import ConfigError
from lifelong_moe.log import LOGGER

EVAL_EXTRA = "pip install 'lifelong-moe[eval]'"
PROGRESS_EVERY = 100  # requests between progress lines (evaluation.lm_eval.progress_every)


def progress(requests: Sequence[Any], kind: str, every: int = PROGRESS_EVERY) -> Iterator[Any]:
    """Yield ``requests``, logging when a task's requests begin and after every ``every``-th
    request and the last: ``lm-eval loglikelihood: 200/480 requests (task arith), 35.1/s``."""
    start, task, total = time.perf_counter(), None, len(requests)
    for done, request in enumerate(requests, 1):
        name = getattr(request, "task_name", None)
        if name != task:
            task = name
            LOGGER.info(f"lm-eval {kind}: task {task}, from request {done} of {total}")
        yield request
        if done % every == 0 or done == total:
            rate = done / max(time.perf_counter() - start, 1e-9)
            LOGGER.info(f"lm-eval {kind}: {done}/{total} requests (task {task}), {rate:.1f}/s")


def require_lm_eval() -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"evaluation.lm_eval.tasks needs lm-evaluation-harness: {EVAL_EXTRA}")


def task_manager(include_path: str | None) -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def check_tasks(tasks: Sequence[str], include_path: str | None) -> Any:
    """The TaskManager that knows every task of ``tasks``; one line naming an unknown one."""
    require_lm_eval()
    manager = task_manager(include_path)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known and not manager.match_tasks([task]):
            where = (
                f" or under evaluation.lm_eval.include_path={include_path}" if include_path else ""
            )
            raise ConfigError(
                f"evaluation.lm_eval.tasks: unknown task {task!r}; expected a task of lm-eval{where}"
            )
    return manager


def _lm_base() -> type:
    require_lm_eval()
    from lm_eval.api.model import LM

    return LM


def make_lm(
    model: nn.Module,
    tokenizer: Any,  # a data.tokenizer.Tokenizer (evaluation does not import data)
    context_length: int,
    device: torch.device,
    batch_size: int = 16,
    progress_every: int = PROGRESS_EVERY,
) -> Any:
    """The toolkit's model as an ``lm_eval.api.model.LM``; each request method logs its
    progress every ``progress_every`` requests."""
    base = _lm_base()

    class ToolkitLM(base):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.model, self.tok, self.where = model, tokenizer, device
            self.max_length, self.batch_size = context_length, batch_size
            vocab = _vocab(model, tokenizer)
            # lm-eval scores a document from its first token with this one as the context
            self.prefix = (
                tokenizer.eos_id if tokenizer.eos_id < vocab else tokenizer.encode("\n")[0]
            )

        def loglikelihood(self, requests: list) -> list[tuple[float, bool]]:
            out = []
            for request in progress(requests, "loglikelihood", progress_every):
                context, target = self.split(*request.args)
                inputs = (context + target)[:-1]
                out.append(score(self.model, inputs, target, self.max_length, self.where))
            return out

        def split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            """Context and continuation ids as lm-eval's Hugging Face model splits them: the
            context's trailing spaces go to the continuation, the pair is encoded as one."""
            if not context:
                return [self.prefix], self.tok.encode(continuation)
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self.tok.encode(context + continuation)
            n = len(self.tok.encode(context))
            return whole[:n], whole[n:]

        def loglikelihood_rolling(self, requests: list) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            out = []
            for request in progress(requests, "loglikelihood_rolling", progress_every):
                (text,) = request.args[:1]
                total = 0.0
                windows = get_rolling_token_windows(
                    token_list=self.tok.encode(text),
                    prefix_token=self.prefix,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
                for context, target in map(make_disjoint_window, windows):
                    total += score(
                        self.model, context + target[:-1], target, self.max_length, self.where
                    )[0]
                out.append(total)
            return out

        def generate_until(self, requests: list) -> list[str]:
            out = []
            for request in progress(requests, "generate_until", progress_every):
                context, kwargs = request.args
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                out.append(
                    greedy(
                        self.model,
                        self.tok,
                        context,
                        until,
                        int(kwargs.get("max_gen_toks", 64)),
                        self.max_length,
                        self.where,
                    )
                )
            return out

    return ToolkitLM()


def _vocab(model: nn.Module, tokenizer: Any) -> int:
    head = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return head[-1].out_features if head else tokenizer.vocab_size


@torch.no_grad()
def logits_of(model: nn.Module, ids: list[int], device: torch.device) -> torch.Tensor:
    """[T, V] next-token logits of ``ids`` (fp32), the model in eval mode."""
    was_training = model.training
    model.eval()
    logits = model(torch.tensor([ids], device=device))[0][0].float()
    model.train(was_training)
    return logits


def score(
    model: nn.Module, inputs: list[int], target: list[int], max_length: int, device: torch.device
) -> tuple[float, bool]:
    """Log-probability of ``target`` after ``inputs`` (``inputs`` = context + target[:-1], whose
    last ``len(target)`` positions predict ``target``) and whether greedy decoding gives it."""
    inputs = inputs[-max_length:]
    logp = F.log_softmax(logits_of(model, inputs, device)[-len(target) :], dim=-1)
    wanted = torch.tensor(target, device=logp.device)
    total = logp.gather(1, wanted[:, None]).sum().item()
    return total, bool((logp.argmax(-1) == wanted).all())


def greedy(
    model: nn.Module,
    tokenizer: Any,  # a data.tokenizer.Tokenizer (evaluation does not import data)
    context: str,
    until: list[str],
    max_new: int,
    max_length: int,
    device: torch.device,
) -> str:
    """Greedy continuation of ``context`` until a stop string or ``max_new`` tokens."""
    ids, new = tokenizer.encode(context), []
    for _ in range(max_new):
        token = int(logits_of(model, (ids + new)[-max_length:], device)[-1].argmax())
        if token == tokenizer.eos_id:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if any(stop in text for stop in until):
            return text[: min(text.index(s) for s in until if s in text)]
    return tokenizer.decode(new)


def downstream_metrics(
    model: nn.Module,
    tokenizer: Any,  # a data.tokenizer.Tokenizer (evaluation does not import data)
    context_length: int,
    device: torch.device,
    tasks: Sequence[str],
    manager: Any,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    progress_every: int = PROGRESS_EVERY,
) -> dict[str, float]:
    """``downstream/<task>/<metric>`` of every task (and group) lm-eval reports.

    lm-eval's global seeding is turned off (the caller keeps the training RNG as it was);
    the few-shot sampler keeps its own fixed seed.
    """
    from lm_eval import simple_evaluate

    results = simple_evaluate(
        model=make_lm(model, tokenizer, context_length, device, batch_size, progress_every),
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
        log_samples=False,
        bootstrap_iters=0,
    )
    out: dict[str, float] = {}
    for task, metrics in (results or {}).get("results", {}).items():
        for metric, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue  # alias, sample counts as strings
            out[names.downstream_metric(task, metric)] = float(value)
    return out


def downstream_due(index: int, n_experiences: int, every: int) -> bool:
    """After every ``every``-th experience and always after the last."""
    return (index + 1) % every == 0 or index == n_experiences - 1


def downstream_table(rows: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    """One record per experience that ran downstream tasks: its index and its metrics."""
    prefix = f"{names.DOWNSTREAM}/"
    table = []
    for index, row in enumerate(rows):
        found = {k.removeprefix(prefix): v for k, v in row.items() if k.startswith(prefix)}
        if found:
            table.append({"experience": index, **found})
    return table
