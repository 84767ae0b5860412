"""Guest kernel and root filesystem recipes, and the builder that turns them into templates."""
