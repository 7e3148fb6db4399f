"""The trainers' own loss code, importable without their distributed stacks.

Notebook 09 and ``tests/test_{trl,verl,openrlhf}_agreement.py`` compare ``utils`` with the functions the
trainers run, not with copies of them. Versions (pinned in requirements-nodeps.txt, installed with
``pip install --no-deps``; trl is an ordinary dependency):

- ``verl==0.9.1``. The PyPI release has no tag in the verl-project/verl snapshot read; against main at
  1dda039b, its ``verl/utils/torch_functional.py`` is identical and ``verl/trainer/ppo/core_algos.py``
  differs only in GSPO's aggregation (L1603-1606), so line numbers at 1dda039b hold for every function used here.
- ``openrlhf==0.11.2``. Newer than the newest OpenRLHF/OpenRLHF commit read, 3c3be623 (tag v0.11.0). Against it,
  ``openrlhf/models/loss.py`` changes only ``PolicyLoss``'s rollout importance-sampling options and
  ``openrlhf/models/utils.py`` adds a clamp of k3's log-ratio at -10 before ``exp`` and an ``unbiased_gradient``
  option to ``compute_approx_kl`` (both off the default path). Cite the installed files' lines for 0.11.2.
- ``trl==1.16.0``: ``GRPOTrainer._compute_loss``, run on our tensors by ``trl_grpo_loss``.

Why a shim: ``import verl.trainer.ppo.core_algos`` runs ``verl/__init__.py``, which imports Ray and TensorDict
(for ``DataProto``), and ``openrlhf.models`` imports its ``Actor`` (DeepSpeed, PEFT, flash-attn). The loss
functions use none of them. So, only while importing and only for modules that are not installed:
the trainer's package ``__init__`` files are skipped (the package is registered with its real path), and the
modules in ``STUBBED`` are answered by stand-ins whose every attribute is an empty placeholder class. The
stand-ins leave ``sys.modules`` once the import is done. With the full stacks installed, nothing is stubbed.

Derived in notebooks/09_real_trainers.ipynb.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from collections import defaultdict
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterator

import torch

PINS = {"verl": "0.9.1", "openrlhf": "0.11.2", "trl": "1.16.0"}
# What the loss modules import at top level but never call: verl (ray, tensordict, omegaconf, codetiming,
# orjson), OpenRLHF's models/utils.py (deepspeed). Only the absent ones are stubbed.
STUBBED = ("ray", "tensordict", "omegaconf", "codetiming", "orjson", "deepspeed")


class _Placeholder(type):
    """A stand-in class: any attribute is another placeholder; used as a decorator it returns the function."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:  # @ray.remote, @tensorclass, ...
            return args[0]
        return _Placeholder("placeholder", (), {})


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _Placeholder(name, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers imports of the named (absent) top-level modules and their submodules with ``_StubModule``s."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] not in self.names:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


@contextlib.contextmanager
def _shim(packages_to_skip: tuple[str, ...]) -> Iterator[None]:
    """Skip the ``__init__`` of ``packages_to_skip`` and stub the absent ``STUBBED`` modules, for one import."""
    absent = {name for name in STUBBED if importlib.util.find_spec(name) is None}
    if not absent:  # the real stacks are installed: import as the trainers do
        yield
        return
    before = set(sys.modules)
    finder = _StubFinder(absent)
    for package in packages_to_skip:
        if package not in sys.modules:  # registered with its real path, __init__.py not run
            sys.modules[package] = importlib.util.module_from_spec(importlib.util.find_spec(package))
    sys.meta_path.insert(0, finder)
    ok = False
    try:
        yield
        ok = True
    finally:
        sys.meta_path.remove(finder)
        for name in set(sys.modules) - before:
            if isinstance(sys.modules[name], _StubModule) or not ok:  # stand-ins always go; all of a failed import
                del sys.modules[name]


def _import(dist: str, module: str, packages_to_skip: tuple[str, ...] = ()) -> types.ModuleType:
    """Import ``module`` of the installed distribution ``dist`` through the shim; clear errors when it cannot."""
    if module in sys.modules:
        return sys.modules[module]
    try:
        installed = version(dist)
    except PackageNotFoundError:
        raise ModuleNotFoundError(
            f"{dist} is not installed; run: pip install --no-deps {dist}=={PINS[dist]} (see requirements-nodeps.txt)",
            name=dist,
        ) from None
    if installed != PINS[dist]:
        warnings.warn(f"{dist} {installed} is installed, the series was checked against {PINS[dist]}", stacklevel=3)
    try:
        with _shim(packages_to_skip):
            return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            f"importing {module} ({dist} {installed}) needs {err.name!r}, which is neither installed nor in "
            "utils.trainers.STUBBED: install it, or add it to STUBBED if the loss code never calls it",
            name=err.name,
        ) from err


@functools.cache
def verl_core_algos() -> types.ModuleType:
    """``verl.trainer.ppo.core_algos``: ``compute_policy_loss_vanilla``, ``agg_loss``, ``kl_penalty``, GAE."""
    return _import("verl", "verl.trainer.ppo.core_algos", ("verl",))


@functools.cache
def verl_functional() -> types.ModuleType:
    """``verl.utils.torch_functional``: ``masked_mean``, ``masked_var``, ``masked_whiten``, ``masked_sum``."""
    return _import("verl", "verl.utils.torch_functional", ("verl",))


def verl_actor_config(**overrides: Any) -> Any:
    """The smallest real ``verl.workers.config.ActorConfig`` (defaults of actor.yaml), with ``overrides``.

    ``compute_policy_loss_vanilla`` reads clip_ratio, clip_ratio_low/high, clip_ratio_c and global_batch_info
    (dp_size, batch_num_tokens, global_batch_size, passed on to ``agg_loss``) from it.
    """
    verl_core_algos()
    from verl.workers.config import ActorConfig

    kwargs = {"strategy": "fsdp", "rollout_n": 1, "ppo_micro_batch_size_per_gpu": 1} | overrides
    return ActorConfig(**kwargs)


@functools.cache
def openrlhf_loss() -> types.ModuleType:
    """``openrlhf.models.loss``: ``PolicyLoss``, ``aggregate_loss``."""
    return _import("openrlhf", "openrlhf.models.loss", ("openrlhf", "openrlhf.models"))


@functools.cache
def openrlhf_utils() -> types.ModuleType:
    """``openrlhf.models.utils``: ``masked_mean``, ``compute_approx_kl``, ``compute_reward``, ``masked_normalize``."""
    return _import("openrlhf", "openrlhf.models.utils", ("openrlhf", "openrlhf.models"))


@functools.cache
def trl_grpo() -> type:
    """``trl.trainer.grpo_trainer.GRPOTrainer`` (trl is a regular dependency, no shim)."""
    return _import("trl", "trl.trainer.grpo_trainer").GRPOTrainer


class _GRPOLossHarness:
    """Only the attributes ``GRPOTrainer._compute_loss`` (trl 1.16.0) reads; our log-probs replace the forward."""

    def __init__(self, log_probs: torch.Tensor, loss_type: str, epsilon: float, epsilon_high: float | None,
                 beta: float) -> None:
        self._log_probs, self.loss_type, self.beta = log_probs, loss_type, beta
        self.epsilon_low, self.epsilon_high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.args = types.SimpleNamespace(delta=None, use_bias_correction_kl=False)
        self.top_entropy_quantile, self.off_policy_mask_threshold, self.importance_sampling_level = 1.0, None, "token"
        self.use_vllm = self.aux_loss_enabled = self._entropy_bonus_enabled = False
        self.model = types.SimpleNamespace(training=False)  # "eval": no division by gradient-accumulation steps
        self.current_gradient_accumulation_steps = 1
        self.accelerator = types.SimpleNamespace(reduce=lambda t, reduction: t, gather=lambda t: t, num_processes=1)
        self._metrics = defaultdict(lambda: defaultdict(list))

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **kwargs):
        return self._log_probs, torch.zeros_like(self._log_probs), None


def trl_grpo_loss(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                  action_mask: torch.Tensor, loss_type: str = "dapo", ref_log_probs: torch.Tensor | None = None,
                  epsilon: float = 0.2, epsilon_high: float | None = None,
                  beta: float = 0.0, *, delta: float | None = None, num_items_in_batch: float | None = None,
                  max_completion_length: int | None = None,
                  importance_sampling_level: str = "token") -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Run TRL's own ``GRPOTrainer._compute_loss`` on [B, T] tensors; returns (loss, TRL's logged metrics).

    Advantages may be [B] (GRPO's per-sequence ones) or [B, T]. ``num_items_in_batch`` (dapo / cispo's divisor,
    the global token count) defaults to the mask's token count; ``max_completion_length`` is dr_grpo's divisor
    (default: T); ``delta`` is ``GRPOConfig.delta``; ``importance_sampling_level="sequence"`` is GSPO.
    """
    B, T = log_probs.shape
    harness = _GRPOLossHarness(log_probs, loss_type, epsilon, epsilon_high, beta)
    harness.args.delta, harness.importance_sampling_level = delta, importance_sampling_level
    harness.max_completion_length = T if max_completion_length is None else max_completion_length
    count = action_mask.sum().float() if num_items_in_batch is None else torch.tensor(float(num_items_in_batch))
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": action_mask,
              "advantages": advantages, "old_per_token_logps": old_log_probs,
              "num_items_in_batch": count}
    if ref_log_probs is not None:
        inputs["ref_per_token_logps"] = ref_log_probs
    loss = trl_grpo()._compute_loss(harness, None, inputs)
    return loss, dict(harness._metrics["eval"])
