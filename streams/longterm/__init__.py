"""Long-term interest in Redis: each user's history and versioned vectors (`store`), and the
periodic refresh that runs the long-term model over changed histories (`refresher`)."""
