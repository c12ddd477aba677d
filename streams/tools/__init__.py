"""User tools: replay and record streams, the live dashboard, the demo, online evaluation."""
