"""The agent's settings in force, and where each provider is reached.

Provider, model and permission mode come from three places, the first that says
wins: the client's `settings` (persisted in the transcript database), the workspace
config's `agent` block, then the daemon's settings. A model name belongs to its
provider: changing provider without a model forgets the stored one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from aetherd.agent.permissions import MODES
from aetherd.agent.providers import DEFAULT_MODELS, KEY_VARIABLES, ProviderConfig
from aetherd.errors import AetherError, ErrorCode
from aetherd.logs import redactor
from aetherd.services.transcript import TranscriptStore
from aetherd.settings import Settings

PROVIDERS = ("anthropic", "openai", "openrouter")
MAX_MODEL = 256


@dataclass(frozen=True)
class InForce:
    """The provider, model and permission mode a new task gets."""

    provider: str
    model: str
    permission_mode: str
    backend: str = "builtin"


def _invalid(field: str, rule: str) -> AetherError:
    return AetherError(ErrorCode.INVALID_MESSAGE, f"invalid field '{field}': {rule}", field=field)


class Defaults:
    """The client's persisted defaults over the workspace config's over the daemon's."""

    def __init__(self, settings: Settings, store: TranscriptStore) -> None:
        self.settings = settings
        self.store = store
        self.user: dict[str, Any] = {}
        self.config: dict[str, Any] = {}

    async def load(self) -> None:
        """Read the client's persisted defaults."""
        self.user = await self.store.load_settings()

    def in_force(self) -> InForce:
        """Provider, model and permission mode in force: client > workspace config > daemon."""
        user, conf, s = self.user, self.config, self.settings
        provider = user.get("provider") or conf.get("provider") or s.agent_provider
        model = user.get("model") or (
            conf.get("model") if conf.get("provider", provider) == provider else None
        )
        if not model and provider == s.agent_provider:
            model = s.agent_model
        mode = user.get("permissionMode") or conf.get("permission_mode") or s.agent_permission_mode
        backend = user.get("backend") or conf.get("backend") or "builtin"
        return InForce(provider, model or DEFAULT_MODELS[provider], mode, backend)

    async def update(
        self,
        provider: str | None,
        model: str | None,
        permission_mode: str | None,
        backend: str | None = None,
    ) -> InForce:
        """Validate and persist the client's defaults; returns the settings in force."""
        if provider is not None and provider not in PROVIDERS:
            raise _invalid("provider", f"must be one of {', '.join(PROVIDERS)}")
        if permission_mode is not None and permission_mode not in MODES:
            raise _invalid("permissionMode", f"must be one of {', '.join(MODES)}")
        if model is not None and not 0 < len(model) <= MAX_MODEL:
            raise _invalid("model", f"1 to {MAX_MODEL} characters")
        changes: dict[str, Any] = {}
        if provider is not None:
            changes["provider"] = provider
            if model is None and provider != self.user.get("provider"):
                changes["model"] = None  # a model name belongs to its provider
        if model is not None:
            changes["model"] = model
        if permission_mode is not None:
            changes["permissionMode"] = permission_mode
        if backend is not None:
            changes["backend"] = backend  # the caller checked that it is declared
        if changes:
            await self.store.save_settings(changes)
            for key, value in changes.items():
                if value is None:
                    self.user.pop(key, None)
                else:
                    self.user[key] = value
        return self.in_force()

    def apply_config(self, defaults: Mapping[str, Any] | None) -> None:
        """The workspace config's `agent` block; invalid values are ignored (the config
        service validates them first)."""
        clean: dict[str, Any] = {}
        for key, value in (defaults or {}).items():
            if key == "provider" and value in PROVIDERS:
                clean[key] = value
            elif key == "model" and isinstance(value, str) and value:
                clean[key] = value
            elif key == "permission_mode" and value in MODES:
                clean[key] = value
            elif key == "backend" and isinstance(value, str) and value:
                clean[key] = value
        self.config = clean


def provider_config(
    settings: Settings, environ: Mapping[str, str], provider: str, model: str
) -> ProviderConfig:
    """Key and base URL of `provider`, or PROVIDER_NOT_CONFIGURED naming the variable."""
    s, env = settings, environ
    if provider == "anthropic":
        key = s.anthropic_api_key or env.get("ANTHROPIC_API_KEY")
        base = s.anthropic_base_url or env.get("ANTHROPIC_BASE_URL") or "https://api.anthropic.com"
    elif provider == "openai":
        key = s.openai_api_key or env.get("OPENAI_API_KEY")
        base = s.openai_base_url or env.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    else:
        key = s.openrouter_api_key or env.get("OPENROUTER_API_KEY")
        base = s.openrouter_base_url
    if key:
        redactor.add(key)  # a provider key never reaches a log line
    else:
        variable = KEY_VARIABLES[provider]
        raise AetherError(
            ErrorCode.PROVIDER_NOT_CONFIGURED,
            f"no API key for provider {provider!r}: set {variable} "
            f"(or --{provider}-api-key / AETHERD_{provider.upper()}_API_KEY)",
            variable=variable,
        )
    return ProviderConfig(
        name=provider,
        base_url=base,
        api_key=key,
        model=model,
        max_tokens=s.agent_max_tokens,
        thinking_budget=s.agent_thinking_budget if provider == "anthropic" else 0,
        retry_attempts=s.agent_retry_attempts,
        retry_base_delay=s.agent_retry_base_delay,
        retry_max_delay=s.agent_retry_max_delay,
    )
