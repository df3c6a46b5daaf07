//! A development PKI: one CA that issues ECDSA P-256 server and client
//! certificates. Used by the tests, by `atls demo` and by `atls serve` when no
//! certificate is given. Not for production identities.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fmt;

use atls_core::{Certificate, CertifiedKey, Error, PrivateKey};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose,
};

/// A certificate authority that can issue leaf certificates.
pub struct DevCa {
    params: CertificateParams,
    key: KeyPair,
    cert: Certificate,
    pem: String,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DevCa")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

fn pki_error(e: rcgen::Error) -> Error {
    Error::Config(format!("certificate generation: {e}"))
}

impl DevCa {
    /// A new CA with the given common name.
    pub fn new(common_name: &str) -> Result<Self, Error> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(pki_error)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "ATLS development PKI");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().map_err(pki_error)?;
        let cert = params.self_signed(&key).map_err(pki_error)?;
        Ok(Self {
            cert: Certificate(cert.der().to_vec()),
            pem: cert.pem(),
            params,
            key,
        })
    }

    /// The CA certificate (the trust anchor).
    pub fn certificate(&self) -> &Certificate {
        &self.cert
    }

    /// The CA certificate as PEM.
    pub fn certificate_pem(&self) -> &str {
        &self.pem
    }

    /// Issue a server certificate for DNS names and IP addresses.
    pub fn issue_server(&self, names: &[&str]) -> Result<IssuedCert, Error> {
        self.issue(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// Issue a client certificate whose common name and SAN is `name`.
    pub fn issue_client(&self, name: &str) -> Result<IssuedCert, Error> {
        self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> Result<IssuedCert, Error> {
        let sans: Vec<String> = names.iter().map(|s| (*s).to_owned()).collect();
        let mut params = CertificateParams::new(sans).map_err(pki_error)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().copied().unwrap_or("atls"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().map_err(pki_error)?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(pki_error)?;
        Ok(IssuedCert {
            cert: Certificate(cert.der().to_vec()),
            cert_pem: cert.pem(),
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
            ca: self.cert.clone(),
        })
    }
}

/// A leaf certificate with its key.
pub struct IssuedCert {
    /// The leaf certificate.
    pub cert: Certificate,
    /// The leaf certificate as PEM.
    pub cert_pem: String,
    key_der: Vec<u8>,
    key_pem: String,
    ca: Certificate,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// Chain (leaf, then the CA) and key, ready for a configuration.
    pub fn certified_key(&self) -> CertifiedKey {
        CertifiedKey {
            chain: vec![self.cert.clone(), self.ca.clone()],
            key: PrivateKey::from_der(self.key_der.clone()),
        }
    }

    /// The PKCS#8 key as PEM, for writing to a state directory.
    pub fn dangerous_key_pem(&self) -> &str {
        &self.key_pem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_a_chain_under_the_ca() {
        let ca = DevCa::new("test CA").expect("ca");
        let leaf = ca.issue_server(&["localhost", "127.0.0.1"]).expect("leaf");
        let key = leaf.certified_key();
        assert_eq!(key.chain.len(), 2);
        assert_eq!(&key.chain[1], ca.certificate());
        assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!format!("{leaf:?}").contains("PRIVATE"));
    }
}
