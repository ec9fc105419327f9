"""Foundation: config model and loading, paths, schedule, state files, errors; imports nothing first-party."""
