"""The leaderboard generator: MLflow runs -> tables, statistics, figures, HTML/Markdown."""
