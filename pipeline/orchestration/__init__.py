"""Running stages as a pipeline: the stage registry, the manifest, skip/resume/restart, launching, tracking."""
