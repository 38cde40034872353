"""What every part of lmpipe may use: user-facing errors and warnings, atomic file writes, project
paths, device choice, offline environment defaults. Imports nothing else of lmpipe."""
