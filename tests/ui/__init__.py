"""Dashboard (/ui) and PNG plot tests."""
