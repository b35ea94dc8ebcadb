-- Subscription snapshots are kept per business, as payments are (0013). Keyed by
-- subscription id alone, a subscription id two businesses used shared one snapshot: the
-- second business's events were decided against the first one's last event time (and
-- found stale) and overwrote its status. The subscription id stays the leading column:
-- ingest looks snapshots up by it.
ALTER TABLE subscriptions
    DROP CONSTRAINT subscriptions_pkey,
    ADD PRIMARY KEY (subscription_id, business_id);
