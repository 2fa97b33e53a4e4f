"""The `inferq` command: starts every part (api, worker, the one-machine stack) and talks to a running one."""
