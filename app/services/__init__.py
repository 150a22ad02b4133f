"""Business logic; views stay thin and call into here."""
