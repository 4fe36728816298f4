"""Running the pipeline on Kubernetes: manifests patched from the config (pure) and the launcher (API calls)."""
