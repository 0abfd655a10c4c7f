"""The OS layer: bubblewrap, cgroups, limits, workspaces and the kernel provisioner. No HTTP in here."""
