"""Small helpers shared by several packages (atomic writes, hashing, seeding)."""
