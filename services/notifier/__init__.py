"""The notifier: webhook subscriptions delivered to Discord, Slack, e-mail and any URL."""
