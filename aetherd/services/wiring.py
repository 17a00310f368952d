"""Live config: the workspace config store feeds every service that depends on it.

Each subscription runs once when the config store starts (with the file as it is then)
and again on every effective change, so edits apply without a daemon restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aetherd.services import Services
    from aetherd.services.config import WorkspaceConfig


def wire_config(services: Services) -> None:
    """Subscribe the services to the config store."""
    store = getattr(services, "config", None)
    if store is None:
        return

    def apply(config: WorkspaceConfig) -> None:
        ports = getattr(services, "ports", None)
        if ports is not None:
            ports.set_port_config(config.ports)
        agent = getattr(services, "agent", None)
        if agent is not None:
            agent.apply_config(
                config.agent.model_dump(exclude_none=True), config.env, config.files.ignore
            )

    store.subscribe(apply)

    terminals = getattr(services, "terminals", None)
    if terminals is not None:
        # Read at each session's start, so new terminals always get the current env.
        terminals.env_provider = lambda: dict(store.current.env)

    watcher = getattr(services, "watcher", None)
    if watcher is not None:
        # set_extra_ignores re-walks the tree off the loop; the store runs it as a task.
        store.subscribe(lambda config: watcher.set_extra_ignores(list(config.files.ignore)))
