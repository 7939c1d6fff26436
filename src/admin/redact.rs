//! Removes secret material from resources before the admin API shows them.
//!
//! `/cache` renders cached resources as protobuf JSON. SDS `Secret` resources, and TLS
//! contexts inlined in listeners and clusters, may carry private keys and shared secrets;
//! these are replaced by `"[redacted]"` wherever they appear (at any depth, in either the
//! JSON or the proto spelling of the field name):
//!
//! | message | fields redacted |
//! |---|---|
//! | `TlsCertificate` | `private_key`, `password`, `pkcs12`, `private_key_provider` |
//! | `TlsSessionTicketKeys` | `keys` (reached as `session_ticket_keys`) |
//! | `GenericSecret` | `secret`, `secrets` (reached as `generic_secret`) |
//!
//! Kept, because they are public: names, certificate chains, OCSP staples, validation
//! contexts (trusted CAs, SAN matchers), watched directories and file names of certificate
//! chains. Invariant: the redaction applies to every rendering of a resource the admin API
//! produces, so no endpoint shows a private key or a shared secret.

use serde_json::Value;

/// What replaces a secret value.
pub const REDACTED: &str = "[redacted]";

/// Fields whose whole value is secret, wherever they appear.
const SECRET_FIELDS: &[&str] = &[
    "private_key",
    "privateKey",
    "password",
    "pkcs12",
    "private_key_provider",
    "privateKeyProvider",
    "session_ticket_keys",
    "sessionTicketKeys",
];

/// Objects whose secret fields are named generically (`secret`, `secrets`).
const GENERIC_SECRETS: &[&str] = &["generic_secret", "genericSecret"];

/// Replaces every secret value in `value` (a rendered resource) with [`REDACTED`].
pub fn redact(value: &mut Value) {
    match value {
        Value::Object(fields) => {
            for (name, field) in fields.iter_mut() {
                if SECRET_FIELDS.contains(&name.as_str()) {
                    *field = Value::from(REDACTED);
                } else if GENERIC_SECRETS.contains(&name.as_str()) {
                    if let Value::Object(generic) = field {
                        for (inner, secret) in generic.iter_mut() {
                            if inner == "secret" || inner == "secrets" {
                                *secret = Value::from(REDACTED);
                            }
                        }
                    } else {
                        *field = Value::from(REDACTED);
                    }
                } else {
                    redact(field);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secret_values_go_and_public_ones_stay() {
        let mut secret = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "server-cert",
            "tlsCertificate": {
                "certificateChain": { "inlineString": "-----BEGIN CERTIFICATE-----" },
                "privateKey": { "inlineBytes": "a2V5" },
                "password": { "inlineString": "hunter2" },
            },
            "sessionTicketKeys": { "keys": [{ "inlineBytes": "dGlja2V0" }] },
            "genericSecret": { "secret": { "inlineString": "hmac" }, "secrets": { "a": { "inlineString": "x" } } },
            "validationContext": { "trustedCa": { "filename": "/etc/ca.pem" } },
        });
        redact(&mut secret);
        let text = secret.to_string();
        for gone in ["a2V5", "hunter2", "dGlja2V0", "hmac", "\"x\""] {
            assert!(!text.contains(gone), "{gone} is still shown: {text}");
        }
        assert_eq!(secret["tlsCertificate"]["privateKey"], REDACTED);
        assert_eq!(secret["genericSecret"]["secret"], REDACTED);
        assert_eq!(secret["name"], "server-cert");
        assert_eq!(secret["tlsCertificate"]["certificateChain"]["inlineString"], "-----BEGIN CERTIFICATE-----");
        assert_eq!(secret["validationContext"]["trustedCa"]["filename"], "/etc/ca.pem");
    }
}
