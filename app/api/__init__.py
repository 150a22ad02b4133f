"""HTTP resources: one flask-smorest blueprint per resource."""
