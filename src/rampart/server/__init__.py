"""The update server: channels, staged rollouts, client identification, fleet reporting."""
