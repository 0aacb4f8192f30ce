//! Where the CF v3 API serves each object: the `links` of API answers and of Package and Droplet statuses, all
//! absolute URLs under the API's external URL. Pure, so the controller (which writes the links into statuses)
//! and the API (which answers with them) agree.

use url::Url;

use crate::resources::{BitsObject, BitsStatus, Droplet, DropletState, Link, Links, Package, PackageType};

/// The external URL of the CF v3 API, e.g. `https://bits.example.com` (a path prefix is kept).
#[derive(Clone, Debug, PartialEq)]
pub struct ApiUrls {
    base: String,
}

impl ApiUrls {
    pub fn new(external: &Url) -> Self {
        ApiUrls { base: external.as_str().trim_end_matches('/').to_string() }
    }

    /// The absolute URL of `path` (which starts with `/`).
    pub fn href(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn package(&self, guid: &str) -> String {
        self.href(&format!("/v3/packages/{guid}"))
    }

    pub fn droplet(&self, guid: &str) -> String {
        self.href(&format!("/v3/droplets/{guid}"))
    }

    pub fn job(&self, guid: &str) -> String {
        self.href(&format!("/v3/jobs/{guid}"))
    }

    pub fn app(&self, guid: &str) -> String {
        self.href(&format!("/v3/apps/{guid}"))
    }

    /// A Package's links: `self` and `app`, and for bits `upload` and `download`.
    pub fn package_links(&self, guid: &str, app: Option<&str>, bits: bool) -> Links {
        let this = self.package(guid);
        Links {
            upload: bits.then(|| link(format!("{this}/upload"), Some("POST"))),
            download: bits.then(|| link(format!("{this}/download"), Some("GET"))),
            self_: Some(link(this, None)),
            app: app.map(|a| link(self.app(a), None)),
            package: None,
        }
    }

    /// A Droplet's links: `upload` only while it awaits one, `download` only once STAGED.
    pub fn droplet_links(
        &self,
        guid: &str,
        app: Option<&str>,
        package: Option<&str>,
        state: Option<DropletState>,
    ) -> Links {
        let this = self.droplet(guid);
        Links {
            upload: (state == Some(DropletState::AwaitingUpload)).then(|| link(format!("{this}/upload"), Some("POST"))),
            download: (state == Some(DropletState::Staged)).then(|| link(format!("{this}/download"), Some("GET"))),
            self_: Some(link(this, None)),
            app: app.map(|a| link(self.app(a), None)),
            package: package.map(|p| link(self.package(p), None)),
        }
    }
}

/// Set `status`'s links; a READY object's artifact is then downloaded through the API.
pub fn set_links<S>(status: &mut BitsStatus<S>, links: Option<Links>) {
    if let (Some(artifact), Some(download)) =
        (status.artifact.as_mut(), links.as_ref().and_then(|l| l.download.as_ref()))
    {
        artifact.url = download.href.clone();
    }
    status.links = links;
}

/// The links an object's status carries.
pub trait Linked: BitsObject {
    fn links(&self, urls: &ApiUrls, state: Option<Self::State>) -> Links;
}

impl Linked for Package {
    fn links(&self, urls: &ApiUrls, _state: Option<Self::State>) -> Links {
        let guid = self.metadata.uid.as_deref().unwrap_or_default();
        let app = self.spec.app_ref.as_ref().map(|a| a.name.as_str());
        urls.package_links(guid, app, self.spec.package_type == PackageType::Bits)
    }
}

impl Linked for Droplet {
    /// Without the Package's link, which needs the Package's guid; the API's answers carry it.
    fn links(&self, urls: &ApiUrls, state: Option<Self::State>) -> Links {
        let guid = self.metadata.uid.as_deref().unwrap_or_default();
        urls.droplet_links(guid, self.spec.app_ref.as_ref().map(|a| a.name.as_str()), None, state)
    }
}

fn link(href: String, method: Option<&str>) -> Link {
    Link { href, method: method.map(str::to_string) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_absolute_and_follow_the_state() {
        let urls = ApiUrls::new(&Url::parse("https://bits.example.com/cf/").unwrap());
        let links = urls.package_links("g1", Some("app1"), true);
        assert_eq!(links.self_.unwrap().href, "https://bits.example.com/cf/v3/packages/g1");
        let upload = links.upload.unwrap();
        assert_eq!(
            (upload.href.as_str(), upload.method.as_deref()),
            ("https://bits.example.com/cf/v3/packages/g1/upload", Some("POST"))
        );
        assert_eq!(links.app.unwrap().href, "https://bits.example.com/cf/v3/apps/app1");
        assert!(urls.package_links("g1", None, false).download.is_none(), "docker packages have no bits");

        let awaiting = urls.droplet_links("d1", None, Some("g1"), Some(DropletState::AwaitingUpload));
        assert!(awaiting.upload.is_some() && awaiting.download.is_none());
        assert_eq!(awaiting.package.unwrap().href, "https://bits.example.com/cf/v3/packages/g1");
        let staged = urls.droplet_links("d1", None, None, Some(DropletState::Staged));
        assert!(staged.upload.is_none() && staged.download.is_some());
    }
}
