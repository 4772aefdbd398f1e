"""The ``on_unsafe`` policy: what happens to an unsafe verdict, and which component's policy is in effect.

Judging (:mod:`lightning_precision.pairing`) and acting are separate steps: :func:`enforce` acts on a verdict, so a
config can be judged once and explained without side effects.

A plugin, the guard and the FSDP2 strategy each take ``on_unsafe``. Left at its default (``None``), a component takes
the policy the user set explicitly elsewhere in the same Trainer (or config); two explicit policies that disagree are
a :class:`~lightning_precision.errors.PrecisionConfigError` naming both, raised at setup on every rank.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import torch

from lightning_precision._logging import info_once, warn_once
from lightning_precision.errors import PrecisionConfigError, PrecisionPairingError
from lightning_precision.modes import PrecisionMode
from lightning_precision.pairing import Api, Status, Verdict, check_optimizer

OnUnsafe = Literal["warn", "error", "ignore"]
ON_UNSAFE_CHOICES: tuple[str, ...] = ("warn", "error", "ignore")
DEFAULT_ON_UNSAFE: OnUnsafe = "warn"


def validate_on_unsafe(value: Any, *, what: str = "on_unsafe") -> OnUnsafe:
    """Check an ``on_unsafe`` policy value.

    Raises:
        PrecisionConfigError: If it is not one of ``"warn"``, ``"error"``, ``"ignore"``.
    """
    if value not in ON_UNSAFE_CHOICES:
        raise PrecisionConfigError(f"{what}={value!r} is not valid. Choose one of: {', '.join(ON_UNSAFE_CHOICES)}.")
    return value


def optional_on_unsafe(value: Any, *, what: str) -> OnUnsafe | None:
    """Validate a component's ``on_unsafe`` argument, where ``None`` means "not set here"."""
    return None if value is None else validate_on_unsafe(value, what=what)


class PolicyHolder:
    """Mixin for components that take ``on_unsafe``: keeps what was given apart from what is in effect.

    Attributes:
        on_unsafe_given: The policy given to this component, ``None`` when left at the default.
    """

    on_unsafe_given: OnUnsafe | None = None
    _on_unsafe_config: OnUnsafe | None = None  # the explicit policy of a config this component learned
    _on_unsafe_adopted: OnUnsafe | None = None  # taken from another component of the same Trainer

    def _init_policy(self, on_unsafe: Any) -> None:
        if on_unsafe is not None and on_unsafe not in ON_UNSAFE_CHOICES:
            raise PrecisionConfigError(
                f"`{type(self).__name__}(on_unsafe={on_unsafe!r})` is not valid. Choose one of: "
                f"{', '.join(ON_UNSAFE_CHOICES)}, or None to follow the rest of the Trainer."
            )
        self.on_unsafe_given = on_unsafe
        self._on_unsafe_config = None
        self._on_unsafe_adopted = None

    @property
    def on_unsafe(self) -> OnUnsafe:
        """The policy in effect: given here, else the config's, else adopted from the Trainer, else ``"warn"``."""
        return self.on_unsafe_given or self._on_unsafe_config or self._on_unsafe_adopted or DEFAULT_ON_UNSAFE

    def explicit_on_unsafe(self) -> tuple[str, OnUnsafe] | None:
        """``(where, policy)`` if a user set this component's policy (here or in its config), else ``None``."""
        if self.on_unsafe_given is not None:
            return f"{type(self).__name__}(on_unsafe=...)", self.on_unsafe_given
        if self._on_unsafe_config is not None:
            return "trainer.lightning_precision.on_unsafe", self._on_unsafe_config
        return None

    def adopt_on_unsafe(self, components: Iterable[Any]) -> OnUnsafe:
        """Take the policy set explicitly on another component of the same run, if none was set for this one.

        Args:
            components: The run's components (precision plugin, strategy, callbacks; see :func:`trainer_components`).

        Returns:
            The policy in effect.

        Raises:
            PrecisionConfigError: If two explicit policies disagree.
        """
        self._on_unsafe_adopted = agreed_policy(explicit_policies([self, *components]))
        return self.on_unsafe


def explicit_policies(components: Iterable[Any]) -> list[tuple[str, OnUnsafe]]:
    """``(where, policy)`` for each distinct component whose policy a user set explicitly."""
    seen: set[int] = set()
    found = []
    for component in components:
        if isinstance(component, PolicyHolder) and id(component) not in seen:
            seen.add(id(component))
            explicit = component.explicit_on_unsafe()
            if explicit is not None:
                found.append(explicit)
    return found


def agreed_policy(explicit: list[tuple[str, OnUnsafe]]) -> OnUnsafe | None:
    """The one explicit policy, ``None`` if none was set.

    Raises:
        PrecisionConfigError: If two explicit policies disagree; the message names both.
    """
    for where, policy in explicit[1:]:
        first_where, first = explicit[0]
        if policy != first:
            raise PrecisionConfigError(
                f"Two on_unsafe policies disagree: {first_where} is {first!r} and {where} is {policy!r}. Set it in one "
                "place (the others follow it), or give both the same value."
            )
    return explicit[0][1] if explicit else None


def trainer_components(trainer: Any) -> list[Any]:
    """The components of a Trainer that may hold a policy: precision plugin, strategy and callbacks."""
    if trainer is None:
        return []
    strategy = getattr(trainer, "strategy", None)
    return [getattr(strategy, "precision_plugin", None), strategy, *getattr(trainer, "callbacks", [])]


def enforce(verdict: Verdict, on_unsafe: OnUnsafe = DEFAULT_ON_UNSAFE, *, where: str = "") -> Verdict:
    """Act on a verdict under an ``on_unsafe`` policy.

    An unsafe pairing raises :class:`PrecisionPairingError` under ``"error"`` (on every rank, since every rank
    judges the same inputs), emits a :class:`PrecisionWarning` under ``"warn"``, and is silent under ``"ignore"``.
    A weak second moment is a warning of its own unless ``"ignore"``. Wasteful or unknown pairings are logged.
    Warnings and log lines appear once per cause per process, on rank zero only.

    Args:
        verdict: What :func:`~lightning_precision.pairing.judge` or
            :func:`~lightning_precision.pairing.check_optimizer` said.
        on_unsafe: The policy.
        where: Where the pairing was seen (e.g. ``"config"``, ``"fit start"``), prefixed to the message.

    Returns:
        The verdict, for chaining.

    Raises:
        PrecisionPairingError: For an unsafe pairing under ``on_unsafe="error"``.
        PrecisionConfigError: If ``on_unsafe`` is not a valid policy.
    """
    error = pairing_error(verdict, on_unsafe, where=where)
    if error is not None:
        raise error
    prefix = f"[{where}] " if where else ""
    if on_unsafe == "ignore" and verdict.status in (Status.UNSAFE, Status.WEAK_STATE):
        return verdict
    if verdict.status in (Status.UNSAFE, Status.WEAK_STATE):
        warn_once(verdict.cause, f"{prefix}{verdict.message}")
    elif verdict.status in (Status.WASTEFUL, Status.UNKNOWN):
        info_once(verdict.cause, f"{prefix}{verdict.message}")
    return verdict


def pairing_error(verdict: Verdict, on_unsafe: OnUnsafe, *, where: str = "") -> PrecisionPairingError | None:
    """The error :func:`enforce` raises for ``verdict`` under ``on_unsafe``, or ``None`` (nothing is raised here).

    Raises:
        PrecisionConfigError: If ``on_unsafe`` is not a valid policy.
    """
    validate_on_unsafe(on_unsafe)
    if verdict.status is not Status.UNSAFE or on_unsafe != "error":
        return None
    prefix = f"[{where}] " if where else ""
    return PrecisionPairingError(f"{prefix}{verdict.message} (raised because on_unsafe='error')")


def check_and_enforce(
    optimizers: Iterable[torch.optim.Optimizer],
    *,
    on_unsafe: OnUnsafe = DEFAULT_ON_UNSAFE,
    peft: bool = False,
    where: str = "",
    storage_was_auto: bool = False,
    precision: PrecisionMode | None = None,
    api: Api = "trainer",
) -> list[Verdict]:
    """Judge each live optimizer with :func:`~lightning_precision.pairing.check_optimizer` (``api``: whose arguments
    the fixes name) and act on it."""
    verdicts = (
        check_optimizer(o, peft=peft, storage_was_auto=storage_was_auto, precision=precision, api=api)
        for o in optimizers
    )
    return [enforce(verdict, on_unsafe, where=where) for verdict in verdicts]
