"""Profiles as stored: the record (masks as bits, LN, head or a shared-head reference, the bank's fingerprint)
with the one compatibility check, and the profile store."""
