"""mmar_operator: the kopf operator that runs MMARJob steps as Kubernetes Jobs."""
