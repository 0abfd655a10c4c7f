"""The OS layer: bubblewrap, cgroups, uids, limits, workspaces, PTYs and pipes, the agent and the kernel
provisioner. No policy and no HTTP in here; the service layer (:mod:`kernelhub.services`) decides, this layer
does. The README's "Layout" section names the module for each concern."""
