//! TLS 1.3 with mutual certificate authentication (rustls, `ring` provider). Both ends hold a
//! directory with `ca.pem` (the CA that signs every node of the cluster), `node.pem` and
//! `node.key` (this node's certificate chain and key). The destination requires a client
//! certificate signed by the CA; the source checks the destination's certificate against the
//! CA under the name [`SERVER_NAME`] (not the address, so nodes can move). rustls has no
//! external pre-shared-key support, so certificates are the only way in.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The name every node certificate carries and every source checks.
pub const SERVER_NAME: &str = "spanvmm-migration";

/// ring, with AES-128-GCM only: TLS 1.3's cheapest strong suite on AES-NI hosts (page data is
/// bulk; 128-bit keys are ample), a third fewer AES rounds than AES-256.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256];
    Arc::new(p)
}

struct Material {
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn load(dir: &Path) -> Result<Material, String> {
    let file = |n: &str| dir.join(n);
    let certs = |n: &str| -> Result<Vec<CertificateDer<'static>>, String> {
        let v = CertificateDer::pem_file_iter(file(n))
            .map_err(|e| format!("{}: {e}", file(n).display()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e}", file(n).display()))?;
        if v.is_empty() {
            return Err(format!("{}: no certificate in it", file(n).display()));
        }
        Ok(v)
    };
    let mut roots = RootCertStore::empty();
    for c in certs("ca.pem")? {
        roots
            .add(c)
            .map_err(|e| format!("{}: {e}", file("ca.pem").display()))?;
    }
    let key = PrivateKeyDer::from_pem_file(file("node.key"))
        .map_err(|e| format!("{}: {e}", file("node.key").display()))?;
    Ok(Material {
        roots,
        chain: certs("node.pem")?,
        key,
    })
}

/// The destination's configuration: TLS 1.3 only, client certificates required.
pub fn server_config(dir: &Path) -> Result<Arc<ServerConfig>, String> {
    let m = load(dir)?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(m.roots), provider())
        .build()
        .map_err(|e| format!("client verifier: {e}"))?;
    let cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain, m.key)
        .map_err(|e| format!("node certificate: {e}"))?;
    Ok(Arc::new(cfg))
}

/// The source's configuration: TLS 1.3 only, the destination checked against the CA, our
/// certificate presented.
pub fn client_config(dir: &Path) -> Result<Arc<ClientConfig>, String> {
    let m = load(dir)?;
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(m.roots)
        .with_client_auth_cert(m.chain, m.key)
        .map_err(|e| format!("node certificate: {e}"))?;
    Ok(Arc::new(cfg))
}

/// The name the source expects the destination's certificate to carry.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

/// Writes a new CA (`ca.pem`, `ca.key`) and one node certificate signed by it (`node.pem`,
/// `node.key`, usable as server and client) into `out`. Copy the directory without `ca.key`
/// to every node.
pub fn generate(out: &Path) -> Result<(), String> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let err = |e: rcgen::Error| e.to_string();
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "spanvmm migration CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let mut node = CertificateParams::new(vec![SERVER_NAME.to_string()]).map_err(err)?;
    node.distinguished_name
        .push(DnType::CommonName, "spanvmm node");
    node.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let node_key = KeyPair::generate().map_err(err)?;
    let node_cert = node.signed_by(&node_key, &ca_cert, &ca_key).map_err(err)?;
    let write = |name: &str, text: String, private: bool| -> Result<(), String> {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))?;
        if private {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(())
    };
    write("ca.pem", ca_cert.pem(), false)?;
    write("ca.key", ca_key.serialize_pem(), true)?;
    write("node.pem", node_cert.pem(), false)?;
    write("node.key", node_key.serialize_pem(), true)?;
    Ok(())
}
