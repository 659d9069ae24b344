"""Notification subscriptions, shared by the admin API (which makes them) and the notifier
(which delivers): the rules of who hears what (`rules`), targets and their masking
(`targets`), the commands (`Notifications`), the `notification_subscriptions` projection and
typed reads (`queries`)."""

from services.domain.notifications.commands import NewSubscription, Notifications
from services.domain.notifications.projection import NotificationSubscriptionsProjection
from services.domain.notifications.targets import KINDS, Kind, mask_target

__all__ = ["KINDS", "Kind", "NewSubscription", "NotificationSubscriptionsProjection",
           "Notifications", "mask_target"]
