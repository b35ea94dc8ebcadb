-- Payments and their reversals are remembered per business. Keyed by payment id alone,
-- a payment id another business had already used was not recorded for the second one,
-- whose refund then found no payment and revoked nothing. The payment id stays the
-- leading column: ingest looks payments up by it.
ALTER TABLE payments
    DROP CONSTRAINT payments_pkey,
    ADD PRIMARY KEY (payment_id, business_id);
ALTER TABLE payment_reversals
    DROP CONSTRAINT payment_reversals_pkey,
    ADD PRIMARY KEY (payment_id, business_id, reason);
