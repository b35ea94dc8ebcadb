-- When Discord refused a customer's stored authorization (the token expired or was
-- revoked): the access page asks the customer to connect again, whatever their grants'
-- statuses. Cleared when they link an account again.
ALTER TABLE discord_links ADD COLUMN needs_authorization_since timestamptz;
