"""Create a container in an Azure Blob storage account reached path-style (as Azurite serves it):
    python3 azurite-container.py ENDPOINT ACCOUNT KEY CONTAINER

A Blob service request signed with Shared Key, as the Azure REST API defines it; no Azure SDK is needed.
Exits 0 when the container exists afterwards (created now or before), 1 otherwise.
"""
import base64
import email.utils
import hashlib
import hmac
import sys
import urllib.error
import urllib.request


def main(endpoint: str, account: str, key: str, container: str) -> int:
    headers = {"x-ms-date": email.utils.formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    # Verb, eleven empty standard headers (no body), the x-ms-* headers, and the resource. On path-style URLs
    # the account appears twice: once as the signer's, once in the path.
    string_to_sign = (
        "PUT\n" + "\n" * 11
        + "".join(f"{name}:{value}\n" for name, value in sorted(headers.items()))
        + f"/{account}/{account}/{container}\nrestype:container"
    )
    signature = hmac.new(base64.b64decode(key), string_to_sign.encode(), hashlib.sha256).digest()
    headers["Authorization"] = f"SharedKey {account}:{base64.b64encode(signature).decode()}"
    headers["Content-Length"] = "0"
    request = urllib.request.Request(f"{endpoint}/{account}/{container}?restype=container", method="PUT", headers=headers)
    try:
        urllib.request.urlopen(request, timeout=5)
    except urllib.error.HTTPError as error:
        if error.status != 409:  # ContainerAlreadyExists
            print(f"creating container {container}: HTTP {error.status}", file=sys.stderr)
            return 1
    except OSError as error:
        print(f"creating container {container}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
