-- Delivered and failed webhook messages older than `webhooks.message_retention` are
-- deleted (with their attempts) a chunk at a time. Messages are written in time order,
-- so a BRIN index on their creation time finds the old ones while costing next to
-- nothing to keep up as messages are written.
CREATE INDEX webhook_messages_created ON webhook_messages USING brin (created_at);
