"""Live config: the workspace config store feeds every service that depends on it.

Each subscription runs once when the config store starts (with the file as it is then)
and again on every effective change, so edits apply without a daemon restart. The
agent is built on first use: `wire_agent_config` subscribes it then (and applies the
config as it is at that moment).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aetherd.agent.runner import AgentRunner
    from aetherd.config_model import WorkspaceConfig
    from aetherd.daemon import Services
    from aetherd.services.config import ConfigStore


def wire_config(services: Services) -> None:
    """Subscribe the services to the config store."""
    store = getattr(services, "config", None)
    if store is None:
        return

    def apply(config: WorkspaceConfig) -> None:
        ports = getattr(services, "ports", None)
        if ports is not None:
            ports.set_port_config(config.ports)

    store.subscribe(apply)

    terminals = getattr(services, "terminals", None)
    if terminals is not None:
        # Read at each session's start, so new terminals always get the current env.
        terminals.env_provider = lambda: dict(store.current.env)

    processes = getattr(services, "processes", None)
    if processes is not None:
        processes.env_provider = lambda: dict(store.current.env)

    watcher = getattr(services, "watcher", None)
    if watcher is not None:
        applied: list[list[str] | None] = [None]

        def apply_ignores(config: WorkspaceConfig) -> Any:
            # set_extra_ignores re-walks the whole tree (off the loop), so only when the
            # patterns change, not on every edit of the config; the store runs it as a task.
            patterns = list(config.files.ignore)
            if patterns == applied[0]:
                return None
            applied[0] = patterns
            return watcher.set_extra_ignores(patterns)

        store.subscribe(apply_ignores)


def wire_agent_config(store: ConfigStore, agent: AgentRunner) -> None:
    """Subscribe the agent to the config store: its `agent` defaults, `env`, ignores."""

    def apply(config: WorkspaceConfig) -> None:
        agent.apply_config(
            config.agent.model_dump(exclude_none=True), config.env, config.files.ignore
        )

    store.subscribe(apply)
