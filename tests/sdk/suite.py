"""The platform's Python SDK (`dodopayments`, pinned in requirements.txt) against a real
guildgate: every Discord-relevant method the SDK has, called as a merchant calls it.

tests/sdk_suite.rs starts and seeds guildgate, then runs this script with:
  GUILDGATE_BASE_URL   where guildgate answers
  GUILDGATE_API_KEY    a key of the seeded business
  GUILDGATE_SEEDED     JSON: kind of object -> the seeded one's id
  GUILDGATE_DELIVERED  JSON: {"body", "headers"} of a webhook guildgate delivered
  GUILDGATE_RECEIVER   a URL guildgate may deliver to

The SDK's models take a missing field as None, so a parsed answer proves little: each
answer's raw JSON is validated again, strictly (no coercion, every required field
present, every value of its declared type), against the model the SDK parses it into.

It also compares guildgate's /openapi.json with the SDK's models, object by object, and
prints a table of every field compared.

Exit status 0 when every call succeeded, every answer kept to its model and the document
agreed with the models.
"""

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, List

import dodopayments
import httpx
import standardwebhooks
from dodopayments import DodoPayments
from dodopayments.types import (
    CustomerListEntitlementsResponse,
    Entitlement,
    Product,
    WebhookDetails,
    WebhookRetrieveSecretResponse,
)
from dodopayments.types.entitlements import (
    EntitlementGrant,
    EntitlementTranslation,
    EntitlementTranslationsListResponse,
)
from dodopayments.types.integration_config_response import DiscordConfig
from dodopayments.types.unwrap_webhook_event import UnwrapWebhookEvent
from dodopayments.types.webhooks import HeaderRetrieveResponse
from pydantic import BaseModel, TypeAdapter, ValidationError

BASE_URL = os.environ["GUILDGATE_BASE_URL"]
SEEDED = json.loads(os.environ["GUILDGATE_SEEDED"])
DELIVERED = json.loads(os.environ["GUILDGATE_DELIVERED"])
RECEIVER = os.environ["GUILDGATE_RECEIVER"]
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "contract" / "webhooks"

# Retries would hide a first answer that failed.
client = DodoPayments(bearer_token=os.environ["GUILDGATE_API_KEY"], base_url=BASE_URL, max_retries=0)

covered: List[str] = []
failures: List[str] = []
by_design: List[str] = []


class Failed(Exception):
    pass


def strict(what: str, type_: Any, raw: str) -> Any:
    """`raw` JSON validated strictly against `type_`; a failure names each bad field."""
    try:
        return TypeAdapter(type_).validate_json(raw, strict=True)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}" for err in e.errors())
        raise Failed(f"{what}: the answer does not keep to the SDK's {getattr(type_, '__name__', type_)}: {problems}\n  answer: {raw}")


def raw_call(method, *args, **kwargs):
    """The raw answer (status, text) of an SDK method, and what the SDK parses it into."""
    response = method(*args, **kwargs)
    parsed = response.parse()
    return response.http_response.status_code, response.http_response.text, parsed


def page(what: str, envelope: str, item: Any, raw: str) -> list:
    """The items of a page, each validated strictly against the SDK's item model."""
    body = json.loads(raw)
    if not isinstance(body, dict) or not isinstance(body.get(envelope), list):
        raise Failed(f"{what}: the page has no `{envelope}` list: {raw}")
    return [strict(f"{what} {envelope}[{i}]", item, json.dumps(x)) for i, x in enumerate(body[envelope])]


def check(name: str, f) -> Any:
    """Runs one covered method's checks; a failure is recorded and the suite goes on."""
    covered.append(name)
    try:
        return f()
    except Failed as e:
        failures.append(f"{name}: {e}")
    except dodopayments.APIStatusError as e:
        failures.append(f"{name}: {e.status_code} {e.response.text}")
    except Exception:
        failures.append(f"{name}: {traceback.format_exc()}")
    return None


def expect(cond: bool, what: str) -> None:
    if not cond:
        raise Failed(what)


def discord_entitlement(name: str, raw: str) -> Entitlement:
    e = strict(name, Entitlement, raw)
    expect(e.integration_type == "discord", f"{name}: integration_type {e.integration_type!r}")
    # The union of configurations would take a Discord one for another kind.
    strict(f"{name} integration_config", DiscordConfig, json.dumps(json.loads(raw)["integration_config"]))
    return e


entitlement_id, grant_id = SEEDED["entitlement"], SEEDED["grant"]
customer_id, product_id = SEEDED["customer"], SEEDED["product"]
guild_id, role_id, endpoint_id = SEEDED["guild"], SEEDED["role"], SEEDED["endpoint"]
made: dict = {}


# --- Entitlements -------------------------------------------------------------------


def create():
    status, raw, parsed = raw_call(
        client.entitlements.with_raw_response.create,
        integration_type="discord",
        integration_config={"guild_id": guild_id, "role_id": role_id},
        name="SDK Discord Role",
        description="made by the SDK suite",
        metadata={"source": "sdk"},
    )
    e = discord_entitlement("entitlements.create", raw)
    expect(parsed.id == e.id, "entitlements.create: the SDK parsed another id")
    expect(e.name == "SDK Discord Role" and e.metadata == {"source": "sdk"}, f"entitlements.create: {raw}")
    made["entitlement"] = e.id


check("entitlements.create", create)
new_id = made.get("entitlement", entitlement_id)


def retrieve():
    _, raw, _ = raw_call(client.entitlements.with_raw_response.retrieve, new_id)
    e = discord_entitlement("entitlements.retrieve", raw)
    expect(e.id == new_id, f"entitlements.retrieve: {raw}")


check("entitlements.retrieve", retrieve)


def update():
    _, raw, _ = raw_call(
        client.entitlements.with_raw_response.update,
        new_id,
        name="SDK Discord Role (renamed)",
        description=None,
        metadata={"source": "sdk", "step": "update"},
    )
    e = discord_entitlement("entitlements.update", raw)
    expect(e.name == "SDK Discord Role (renamed)", f"entitlements.update: name not changed: {raw}")
    expect(e.metadata == {"source": "sdk", "step": "update"}, f"entitlements.update: metadata: {raw}")


check("entitlements.update", update)


def extension_keys():
    # guildgate's own integration_config key goes through the SDK's typed call and
    # comes back on read, both in the raw answer and on the SDK's parsed model.
    status, raw, _ = raw_call(
        client.entitlements.with_raw_response.update,
        new_id,
        integration_config={"guild_id": guild_id, "role_id": role_id, "grace_period_days": 7},
    )
    expect(status == 200, f"entitlements.update (grace_period_days): {status} {raw}")
    _, raw, parsed = raw_call(client.entitlements.with_raw_response.retrieve, new_id)
    discord_entitlement("entitlements.retrieve (grace_period_days)", raw)
    expect(json.loads(raw)["integration_config"].get("grace_period_days") == 7, f"grace_period_days not kept: {raw}")
    expect(
        getattr(parsed.integration_config, "grace_period_days", None) == 7,
        f"the SDK's model does not carry grace_period_days: {parsed.integration_config!r}",
    )


check("entitlements.update with integration_config.grace_period_days (extension)", extension_keys)


def list_entitlements():
    _, raw, parsed = raw_call(client.entitlements.with_raw_response.list, integration_type="discord", page_size=100)
    items = page("entitlements.list", "items", Entitlement, raw)
    ids = {e.id for e in items}
    expect({entitlement_id, new_id} <= ids, f"entitlements.list: missing seeded or created: {raw}")
    expect(len(parsed.items) == len(items), "entitlements.list: the SDK parsed another count")
    # Pages by hand: pages count from 0 (as on the platform), and the SDK's own
    # iterator asks for page 2 after the first page, skipping page 1.
    walked = []
    for number in range(len(ids) + 1):
        got = client.entitlements.list(page_size=1, page_number=number).items
        expect(len(got) <= 1, f"entitlements.list page_size=1 answered {len(got)}")
        walked += [e.id for e in got]
    expect(sorted(walked) == sorted(ids), f"entitlements.list: paging by one found {walked}, not {sorted(ids)}")


check("entitlements.list", list_entitlements)


def list_grants():
    _, raw, _ = raw_call(client.entitlements.grants.with_raw_response.list, entitlement_id)
    grants = page("entitlements.grants.list", "items", EntitlementGrant, raw)
    expect(any(g.id == grant_id for g in grants), f"entitlements.grants.list: no seeded grant: {raw}")
    _, raw, _ = raw_call(
        client.entitlements.grants.with_raw_response.list,
        entitlement_id,
        customer_id=customer_id,
        status="Pending",
        page_number=0,
        page_size=10,
    )
    grants = page("entitlements.grants.list (filtered)", "items", EntitlementGrant, raw)
    expect([g.id for g in grants] == [grant_id], f"entitlements.grants.list filtered: {raw}")


check("entitlements.grants.list", list_grants)


# --- Customers ----------------------------------------------------------------------


def customer_entitlements():
    _, raw, _ = raw_call(client.customers.with_raw_response.list_entitlements, customer_id)
    r = strict("customers.list_entitlements", CustomerListEntitlementsResponse, raw)
    expect(len(r.items) >= 1, f"customers.list_entitlements: empty: {raw}")


check("customers.list_entitlements", customer_entitlements)


def customer_grants():
    _, raw, _ = raw_call(
        client.customers.with_raw_response.list_entitlement_grants, customer_id, integration_type="discord"
    )
    grants = page("customers.list_entitlement_grants", "items", EntitlementGrant, raw)
    expect(any(g.id == grant_id for g in grants), f"customers.list_entitlement_grants: {raw}")
    _, raw, _ = raw_call(
        client.customers.with_raw_response.list_entitlement_grants,
        customer_id,
        integration_type="telegram",
        status="Pending",
    )
    expect(page("customers.list_entitlement_grants (telegram)", "items", EntitlementGrant, raw) == [], raw)


check("customers.list_entitlement_grants", customer_grants)


# --- Products -----------------------------------------------------------------------

# The platform's product object; guildgate serves only the fields it has and leaves the
# platform's own (price, tax category, timestamps, ...) out rather than make them up.
SERVED = {"product_id", "business_id", "brand_id", "entitlements"}


def product_view(name: str, raw: str) -> list:
    body = json.loads(raw)
    for field, info in Product.model_fields.items():
        if field in SERVED:
            expect(field in body, f"{name}: no `{field}`: {raw}")
            strict(f"{name} {field}", info.annotation, json.dumps(body[field]))
        elif info.is_required() and field not in body:
            entry = f"products.retrieve: `{field}` (the platform's)"
            if entry not in by_design:
                by_design.append(entry)
    return [e["id"] for e in body["entitlements"]]


def product_retrieve():
    _, raw, _ = raw_call(client.products.with_raw_response.retrieve, product_id)
    expect(product_view("products.retrieve", raw) == [entitlement_id], f"products.retrieve: {raw}")


check("products.retrieve", product_retrieve)


def product_update():
    status, raw, _ = raw_call(
        client.products.with_raw_response.update,
        product_id,
        entitlements=[{"entitlement_id": entitlement_id}, {"entitlement_id": new_id}],
        # The platform's own fields are accepted and left to it.
        name="ignored by guildgate",
    )
    expect(status == 200, f"products.update: {status} {raw}")
    _, raw, _ = raw_call(client.products.with_raw_response.retrieve, product_id)
    got = product_view("products.update", raw)
    expect(got == [entitlement_id, new_id], f"products.update: entitlements now {got}")


check("products.update", product_update)


# --- Webhook endpoints --------------------------------------------------------------


def webhooks():
    _, raw, _ = raw_call(
        client.webhooks.with_raw_response.create,
        url=RECEIVER,
        description="SDK suite",
        filter_types=["entitlement_grant.created", "entitlement_grant.revoked"],
        headers={"x-sdk-suite": "1"},
        metadata={"source": "sdk"},
    )
    w = strict("webhooks.create", WebhookDetails, raw)
    made["endpoint"] = w.id
    expect(w.url == RECEIVER and w.description == "SDK suite", f"webhooks.create: {raw}")


check("webhooks.create", webhooks)
new_endpoint = made.get("endpoint", endpoint_id)


def webhook_retrieve():
    _, raw, _ = raw_call(client.webhooks.with_raw_response.retrieve, new_endpoint)
    expect(strict("webhooks.retrieve", WebhookDetails, raw).id == new_endpoint, raw)


check("webhooks.retrieve", webhook_retrieve)


def webhook_update():
    _, raw, _ = raw_call(
        client.webhooks.with_raw_response.update,
        new_endpoint,
        description="SDK suite (updated)",
        disabled=True,
        metadata={"source": "sdk", "step": "update"},
    )
    w = strict("webhooks.update", WebhookDetails, raw)
    expect(w.description == "SDK suite (updated)" and w.disabled is True, f"webhooks.update: {raw}")


check("webhooks.update", webhook_update)


def webhook_list():
    _, raw, _ = raw_call(client.webhooks.with_raw_response.list, limit=1)
    first = page("webhooks.list", "data", WebhookDetails, raw)
    expect(len(first) == 1, f"webhooks.list limit=1: {raw}")
    walked = [w.id for w in client.webhooks.list(limit=1)]
    expect(sorted(walked) == sorted({endpoint_id, new_endpoint}), f"webhooks.list: paging found {walked}")


check("webhooks.list", webhook_list)


def webhook_headers():
    status, raw, _ = raw_call(
        client.webhooks.headers.with_raw_response.update, new_endpoint, headers={"x-sdk-suite": "2", "x-more": "a"}
    )
    expect(200 <= status < 300, f"webhooks.headers.update: {status} {raw}")
    _, raw, _ = raw_call(client.webhooks.headers.with_raw_response.retrieve, new_endpoint)
    h = strict("webhooks.headers.retrieve", HeaderRetrieveResponse, raw)
    expect(h.headers.get("x-sdk-suite") == "2" and h.headers.get("x-more") == "a", f"webhooks.headers: {raw}")


covered.append("webhooks.headers.update")
check("webhooks.headers.retrieve", webhook_headers)


def webhook_secret() -> str:
    _, raw, _ = raw_call(client.webhooks.with_raw_response.retrieve_secret, endpoint_id)
    s = strict("webhooks.retrieve_secret", WebhookRetrieveSecretResponse, raw)
    expect(s.secret.startswith("whsec_"), f"webhooks.retrieve_secret: {raw}")
    return s.secret


secret = check("webhooks.retrieve_secret", webhook_secret)


def webhook_delete():
    status, raw, _ = raw_call(client.webhooks.with_raw_response.delete, new_endpoint)
    expect(200 <= status < 300, f"webhooks.delete: {status} {raw}")
    try:
        client.webhooks.retrieve(new_endpoint)
        raise Failed("webhooks.delete: the endpoint is still there")
    except dodopayments.NotFoundError:
        pass


check("webhooks.delete", webhook_delete)


# --- Webhook verification -----------------------------------------------------------


def unwrap_delivered():
    expect(secret is not None, "no secret to verify with")
    body, headers = DELIVERED["body"], DELIVERED["headers"]
    event = client.webhooks.unwrap(body, headers=headers, key=secret)
    strict("webhooks.unwrap (delivered)", UnwrapWebhookEvent, body)
    expect(event.type == "entitlement_grant.created", f"webhooks.unwrap: type {event.type}")
    expect(event.data.id == grant_id, f"webhooks.unwrap: grant {event.data.id}")
    try:
        client.webhooks.unwrap(body, headers=headers, key="whsec_" + "A" * 32)
        raise Failed("webhooks.unwrap accepted a delivery under another secret")
    except standardwebhooks.webhooks.WebhookVerificationError:
        pass


check("webhooks.unwrap", unwrap_delivered)


def unwrap_fixtures():
    key = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    fixtures = sorted(FIXTURES.glob("*.json"))
    expect(len(fixtures) >= 4, f"no webhook fixtures in {FIXTURES}")
    for path in fixtures:
        body = path.read_text()
        msg_id, now = f"msg_{path.stem}", int(time.time())
        from datetime import datetime, timezone

        signature = standardwebhooks.Webhook(key).sign(msg_id, datetime.fromtimestamp(now, timezone.utc), body)
        headers = {"webhook-id": msg_id, "webhook-timestamp": str(now), "webhook-signature": signature}
        event = client.webhooks.unwrap(body, headers=headers, key=key)
        strict(f"webhooks.unwrap ({path.name})", UnwrapWebhookEvent, body)
        expect(event.type == path.stem, f"webhooks.unwrap ({path.name}): type {event.type}")


check("webhooks.unwrap (fixtures)", unwrap_fixtures)


# --- Translations ------------------------------------------------------------------


def translations():
    status, raw, _ = raw_call(
        client.entitlements.translations.with_raw_response.update,
        "fr",
        id=new_id,
        name="Rôle Discord",
        description="créé par la suite SDK",
    )
    t = strict("entitlements.translations.update", EntitlementTranslation, raw)
    expect(status == 201, f"entitlements.translations.update: a new locale answered {status}")
    expect(t.locale == "fr" and t.name == "Rôle Discord", f"entitlements.translations.update: {raw}")
    status, raw, _ = raw_call(
        client.entitlements.translations.with_raw_response.update, "fr", id=new_id, name="Rôle Discord (bis)"
    )
    t = strict("entitlements.translations.update (replace)", EntitlementTranslation, raw)
    expect(status == 200, f"entitlements.translations.update: a replaced locale answered {status}")
    expect(t.name == "Rôle Discord (bis)" and t.description is None, f"entitlements.translations.update: {raw}")


check("entitlements.translations.update", translations)


def list_translations():
    _, raw, parsed = raw_call(client.entitlements.translations.with_raw_response.list, new_id)
    answer = strict("entitlements.translations.list", EntitlementTranslationsListResponse, raw)
    expect([t.locale for t in answer.items] == ["fr"], f"entitlements.translations.list: {raw}")
    expect(len(parsed.items) == 1, "entitlements.translations.list: the SDK parsed another count")
    _, raw, _ = raw_call(client.entitlements.translations.with_raw_response.list, new_id, locale=["de", "es"])
    answer = strict("entitlements.translations.list (filtered)", EntitlementTranslationsListResponse, raw)
    expect(answer.items == [], f"entitlements.translations.list locale=de,es: {raw}")


check("entitlements.translations.list", list_translations)


def localized_reads():
    _, raw, _ = raw_call(client.entitlements.with_raw_response.retrieve, new_id, locale="fr")
    e = discord_entitlement("entitlements.retrieve (locale)", raw)
    expect(e.name == "Rôle Discord (bis)", f"entitlements.retrieve locale=fr: {raw}")
    _, raw, _ = raw_call(client.entitlements.with_raw_response.list, locale="fr", page_size=100)
    items = page("entitlements.list (locale)", "items", Entitlement, raw)
    names = {e.id: e.name for e in items}
    expect(names.get(new_id) == "Rôle Discord (bis)", f"entitlements.list locale=fr: {raw}")
    # An unknown code shows the base text, as the SDK documents.
    e = client.entitlements.retrieve(new_id, locale="xx")
    expect(e.name == "SDK Discord Role (renamed)", f"entitlements.retrieve locale=xx: {e.name!r}")
    # The product shows its entitlements translated too.
    _, raw, _ = raw_call(client.products.with_raw_response.retrieve, product_id, locale="fr")
    product_view("products.retrieve (locale)", raw)
    names = {e["id"]: e["name"] for e in json.loads(raw)["entitlements"]}
    expect(names.get(new_id) == "Rôle Discord (bis)", f"products.retrieve locale=fr: {raw}")


check("entitlements.retrieve/list, products.retrieve (locale)", localized_reads)


def delete_translation():
    status, raw, _ = raw_call(client.entitlements.translations.with_raw_response.delete, "fr", id=new_id)
    expect(200 <= status < 300, f"entitlements.translations.delete: {status} {raw}")
    expect(client.entitlements.translations.list(new_id).items == [], "entitlements.translations.delete: still listed")
    try:
        client.entitlements.translations.delete("fr", id=new_id)
        raise Failed("entitlements.translations.delete: a deleted locale was deleted again")
    except dodopayments.NotFoundError:
        pass


check("entitlements.translations.delete", delete_translation)


def comp_grant():
    # An extension route, through the SDK's own client (its auth, retries and errors).
    r = client.post(
        f"/entitlements/{new_id}/grants",
        body={"customer_id": "cus_sdk_comp"},
        cast_to=httpx.Response,
    )
    expect(r.status_code == 201, f"POST /entitlements/{{id}}/grants: {r.status_code} {r.text}")
    g = strict("comp grant", EntitlementGrant, r.text)
    expect(g.payment_id is None and g.subscription_id is None, f"comp grant has a source: {r.text}")
    again = client.post(
        f"/entitlements/{new_id}/grants",
        body={"customer_id": "cus_sdk_comp"},
        cast_to=httpx.Response,
    )
    expect(again.status_code == 200 and again.json()["id"] == g.id, f"a repeat made another: {again.text}")
    listed = client.entitlements.grants.list(new_id, customer_id="cus_sdk_comp")
    expect([x.id for x in listed.items] == [g.id], f"grants.list does not show the comp grant: {listed}")


check("comp access through the SDK's client (extension)", comp_grant)


# --- Revoking and deleting, last: they take away what the rest reads ----------------


def revoke():
    _, raw, _ = raw_call(client.entitlements.grants.with_raw_response.revoke, grant_id, id=entitlement_id)
    g = strict("entitlements.grants.revoke", EntitlementGrant, raw)
    expect(g.id == grant_id and g.status == "Revoked", f"entitlements.grants.revoke: {raw}")


check("entitlements.grants.revoke", revoke)


def delete():
    status, raw, _ = raw_call(client.entitlements.with_raw_response.delete, new_id)
    expect(200 <= status < 300, f"entitlements.delete: {status} {raw}")
    try:
        client.entitlements.retrieve(new_id)
        raise Failed("entitlements.delete: the entitlement is still there")
    except dodopayments.NotFoundError:
        pass


check("entitlements.delete", delete)


def not_found():
    try:
        client.entitlements.retrieve("ent_doesnotexist")
        raise Failed("an unknown entitlement was found")
    except dodopayments.NotFoundError:
        pass


check("errors: NotFoundError on an unknown id", not_found)


# --- The OpenAPI document agrees with the SDK's models ------------------------------
#
# A merchant's generator or reviewer reads /openapi.json, the SDK reads the wire: every
# object both know is compared field by field. A field the SDK requires must be
# documented as required; nullability must agree; JSON types must agree.

# The SDK's fields guildgate does not serve, on purpose (docs/migrating.md): (object,
# field) -> why.
NOT_SERVED = {
    ("Product", field): "the platform's product data; guildgate keeps only its entitlements (docs/migrating.md)"
    for field in (
        "created_at",
        "updated_at",
        "credit_entitlements",
        "is_recurring",
        "license_key_enabled",
        "metadata",
        "price",
        "tax_category",
        "addons",
        "description",
        "digital_product_delivery",
        "image",
        "license_key_activation_message",
        "license_key_activations_limit",
        "license_key_duration",
        "name",
        "pricing_mode",
        "product_collection_id",
    )
}
NOT_SERVED.update(
    {
        ("EntitlementTranslation", f): "belongs to license-key and digital-file entitlements, never Discord ones"
        for f in ("activation_message", "instructions")
    }
)
# Fields the SDK takes as optional or nullable that guildgate always sends, non-null:
# documenting them as required and non-null is narrower than the SDK, and true.
ALWAYS_SENT = {
    ("EntitlementGrant", "oauth_url"): "a Discord grant always has its connect link",
    ("EntitlementGrant", "oauth_expires_at"): "a Discord grant's connect link always expires",
    ("WebhookDetails", "disabled"): "an endpoint is enabled or disabled, never unknown",
    ("CursorPage", "done"): "a page always says whether it is the last",
}

# Objects the SDK declares that guildgate always sends as null, so there is nothing
# inside them to compare: (object, field) -> why.
ALWAYS_NULL = {
    ("EntitlementGrant", f): "filled by the platform for other integration types only; null on every Discord grant"
    for f in ("license_key", "digital_product_delivery", "feature")
}


def sdk_shape(annotation: Any):
    """(JSON types, nullable) of a pydantic annotation."""
    import datetime
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union:
        nullable = type(None) in args
        types = set()
        for a in args:
            if a is not type(None):
                t, n = sdk_shape(a)
                types |= t
                nullable = nullable or n
        return types, nullable
    if origin is typing.Literal:
        return {{str: "string", int: "integer", bool: "boolean"}[type(args[0])]}, False
    if origin in (list, List):
        return {"array"}, False
    if origin is dict:
        return {"object"}, False
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"object"}, False
    return {
        {str: "string", datetime.datetime: "string", int: "integer", float: "number", bool: "boolean"}[annotation]
    }, False


def doc_shape(doc: dict, schema: dict):
    """(JSON types, nullable) of an OpenAPI 3.1 schema, following `$ref`s."""
    if "$ref" in schema:
        return doc_shape(doc, resolve(doc, schema))
    for key in ("oneOf", "anyOf"):
        if key in schema:
            types, nullable = set(), False
            for s in schema[key]:
                t, n = doc_shape(doc, s)
                types |= t
                nullable = nullable or n
            return types, nullable
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return doc_shape(doc, schema["allOf"][0])
    t = schema.get("type")
    if t is None and "enum" in schema:
        t = sorted({{str: "string", int: "integer", bool: "boolean"}[type(v)] for v in schema["enum"] if v is not None})
        return set(t), None in schema["enum"]
    types = set(t if isinstance(t, list) else [t] if t else [])
    nullable = "null" in types or schema.get("nullable") is True
    types.discard("null")
    if not types:
        raise Failed(f"the document's schema {schema} has no JSON type")
    return types, nullable


def resolve(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = doc["components"]["schemas"][name]
    return schema


def answer(doc: dict, method: str, path: str) -> dict:
    """The schema of an operation's 200 answer."""
    op = doc["paths"][path][method]
    return resolve(doc, op["responses"]["200"]["content"]["application/json"]["schema"])


def prop(doc: dict, schema: dict, field: str) -> dict:
    return resolve(doc, schema["properties"][field])


def items(doc: dict, schema: dict, field: str) -> dict:
    return resolve(doc, prop(doc, schema, field)["items"])


agreement: List[tuple] = []
# (model, schema) pairs already compared, so a nested object reached twice is one row set.
compared: set = set()


def sdk_values(annotation: Any):
    """The values a `Literal` annotation allows (through Optional/Union), else None."""
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return set(typing.get_args(annotation))
    if origin is typing.Union:
        values = set()
        for a in typing.get_args(annotation):
            if a is type(None):
                continue
            v = sdk_values(a)
            if v is None:
                return None
            values |= v
        return values
    return None


def doc_values(doc: dict, schema: dict):
    """The values an OpenAPI schema allows (`enum`, `const`, through `$ref`/oneOf), else None."""
    schema = resolve(doc, schema)
    if "enum" in schema:
        return {v for v in schema["enum"] if v is not None}
    if "const" in schema:
        return {schema["const"]}
    for key in ("oneOf", "anyOf"):
        if key in schema:
            values = set()
            for s in schema[key]:
                s = resolve(doc, s)
                if s.get("type") == "null":
                    continue
                v = doc_values(doc, s)
                if v is None:
                    return None
                values |= v
            return values
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return doc_values(doc, schema["allOf"][0])
    return None


def nested_model(annotation: Any):
    """(model, is_list) when the annotation is one pydantic model, a list of one, or
    either of them optional; else None."""
    import typing

    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Union and len(args) == 1:
        return nested_model(args[0])
    if origin in (list, List) and len(args) == 1:
        inner = nested_model(args[0])
        return (inner[0], True) if inner and not inner[1] else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None


def object_schema(doc: dict, schema: dict):
    """The object schema behind a (possibly nullable) property, or None."""
    schema = resolve(doc, schema)
    if "properties" in schema:
        return schema
    for key in ("oneOf", "anyOf"):
        objects = [o for o in (object_schema(doc, s) for s in schema.get(key, [])) if o]
        if len(objects) == 1:
            return objects[0]
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return object_schema(doc, schema["allOf"][0])
    return None


def agree(label: str, model: Any, schema: dict, doc: dict) -> None:
    """Compares `model`'s fields with `schema`, and the objects nested in them; records a
    row per field."""
    key = (model, json.dumps(schema, sort_keys=True))
    if key in compared:
        return
    compared.add(key)
    name = label.split(" ")[0]
    props, required = schema.get("properties", {}), set(schema.get("required", []))
    for field, info in model.model_fields.items():
        sdk_types, sdk_null = sdk_shape(info.annotation)
        sdk_required = info.is_required()
        sdk = f"{'|'.join(sorted(sdk_types))}{'?' if sdk_null else ''}{'' if sdk_required else ' opt'}"
        if (name, field) in NOT_SERVED:
            agreement.append((label, field, sdk, "-", "not served: " + NOT_SERVED[(name, field)]))
            continue
        if field not in props:
            agreement.append((label, field, sdk, "absent", "DISAGREE"))
            failures.append(f"openapi {label}.{field}: the SDK has it, the document does not")
            continue
        doc_types, doc_null = doc_shape(doc, props[field])
        doc_required = field in required
        documented = f"{'|'.join(sorted(doc_types))}{'?' if doc_null else ''}{'' if doc_required else ' opt'}"
        problems = []
        if not doc_types & sdk_types:
            problems.append(f"type {sorted(doc_types)} where the SDK has {sorted(sdk_types)}")
        if sdk_required and not doc_required:
            problems.append("the SDK requires it, the document does not")
        if not sdk_null and doc_null:
            problems.append("documented nullable, the SDK takes no null")
        narrower = (sdk_null or not sdk_required) and doc_required and not doc_null
        if narrower and (name, field) not in ALWAYS_SENT:
            problems.append("documented as always sent non-null, the SDK takes it as optional")
        # Allowed values: everything the document says may be sent, the SDK must accept.
        allowed = sdk_values(info.annotation)
        if allowed is not None:
            values = doc_values(doc, props[field])
            if values is None:
                problems.append(f"the SDK takes only {sorted(allowed)}, the document allows any value")
            elif not values <= allowed:
                problems.append(f"documented values {sorted(values - allowed)} the SDK does not take")
            else:
                documented += f" {len(values)} values"
        if problems:
            failures.append(f"openapi {label}.{field}: " + "; ".join(problems))
        verdict = "DISAGREE" if problems else ("ok, always sent: " + ALWAYS_SENT[(name, field)] if narrower else "ok")
        agreement.append((label, field, sdk, documented, verdict))
        # Inside nested objects, field by field as well.
        nested = nested_model(info.annotation)
        if nested and (name, field) in ALWAYS_NULL:
            verdict += ", always null: " + ALWAYS_NULL[(name, field)]
            agreement[-1] = (label, field, sdk, documented, verdict)
        elif nested and not problems:
            inner_model, is_list = nested
            inner = resolve(doc, props[field])
            if is_list:
                inner = object_schema(doc, inner.get("items", {})) if "items" in inner else None
                if inner is None:
                    inner = object_schema(doc, next((s.get("items", {}) for s in resolve(doc, props[field]).get("oneOf", []) if "items" in s), {}))
            else:
                inner = object_schema(doc, inner)
            if inner is None:
                failures.append(f"openapi {label}.{field}: the SDK has an object {inner_model.__name__}, the document no object schema")
            else:
                agree(f"{inner_model.__name__} (in {label}.{field})", inner_model, inner, doc)


def openapi_agrees():
    import typing

    from dodopayments.pagination import SyncCursorPagePagination
    from dodopayments.types.customer_list_entitlements_response import Item
    from dodopayments.types.product_entitlement_summary import ProductEntitlementSummary

    doc = client.get("/openapi.json", cast_to=httpx.Response).json()
    entitlement = answer(doc, "get", "/entitlements/{id}")
    grants = answer(doc, "get", "/entitlements/{id}/grants")
    customer = answer(doc, "get", "/customers/{customer_id}/entitlements")
    translations = answer(doc, "get", "/entitlements/{id}/translations")
    product = answer(doc, "get", "/products/{product_id}")
    pages = answer(doc, "get", "/webhooks")

    class CursorPage(BaseModel):
        # The SDK's cursor page, without its machinery.
        data: List[WebhookDetails]
        iterator: typing.Optional[str] = None
        done: typing.Optional[bool] = None

    expect(
        set(CursorPage.model_fields) == set(SyncCursorPagePagination.model_fields),
        f"the SDK's cursor page changed: {sorted(SyncCursorPagePagination.model_fields)}",
    )
    pairs = [
        ("Entitlement", Entitlement, entitlement),
        ("DiscordConfig", DiscordConfig, prop(doc, entitlement, "integration_config")),
        ("EntitlementGrant", EntitlementGrant, items(doc, grants, "items")),
        ("EntitlementGrant (single)", EntitlementGrant, answer(doc, "get", "/entitlements/{id}/grants/{grant_id}")),
        ("WebhookDetails", WebhookDetails, answer(doc, "get", "/webhooks/{id}")),
        ("CursorPage", CursorPage, pages),
        ("WebhookDetails (in a page)", WebhookDetails, items(doc, pages, "data")),
        ("EntitlementTranslationsListResponse", EntitlementTranslationsListResponse, translations),
        ("EntitlementTranslation", EntitlementTranslation, items(doc, translations, "items")),
        ("CustomerListEntitlementsResponse", CustomerListEntitlementsResponse, customer),
        ("CustomerEntitlementItem", Item, items(doc, customer, "items")),
        ("Product", Product, product),
        ("ProductEntitlementSummary", ProductEntitlementSummary, items(doc, product, "entitlements")),
    ]
    for name, model, schema in pairs:
        agree(name, model, schema, doc)
    widths = [max(len(str(row[i])) for row in agreement) for i in range(4)]
    print(f"OpenAPI document against the SDK's models ({len(agreement)} fields):")
    print(f"  {'object':{widths[0]}}  {'field':{widths[1]}}  {'SDK':{widths[2]}}  {'document':{widths[3]}}  verdict")
    for row in agreement:
        print(f"  {row[0]:{widths[0]}}  {row[1]:{widths[1]}}  {row[2]:{widths[2]}}  {row[3]:{widths[3]}}  {row[4]}")


check("openapi.json agrees with the SDK's models", openapi_agrees)

print(f"dodopayments {dodopayments.__version__}: {len(covered)} methods called")
for name in covered:
    print(f"  {name}")
if by_design:
    print("Left to the platform by design (absent, not made up):")
    for entry in by_design:
        print(f"  {entry}")
if failures:
    print(f"{len(failures)} FAILED:")
    for entry in failures:
        print(f"  {entry}")
    sys.exit(1)
print("all checks passed")
