// The token: taken from the URL fragment (#token=…, which browsers never send to a
// server), kept in sessionStorage (this tab only), and removed from the address bar.

const KEY = "aetherd.token";

export interface LocationLike {
  hash: string;
  pathname: string;
  search: string;
}

/** Read `token` from a fragment such as "#token=abc&x=1" (URL-decoded), or null. */
export function tokenFromFragment(hash: string): string | null {
  const params = new URLSearchParams(hash.replace(/^#/, ""));
  const token = params.get("token");
  return token ? token : null;
}

export function takeToken(location: LocationLike, storage: Storage, history: History | null): string | null {
  const fromUrl = tokenFromFragment(location.hash);
  if (fromUrl) {
    storage.setItem(KEY, fromUrl);
    // Drop the fragment without a reload and without a new history entry.
    history?.replaceState(null, "", location.pathname + location.search);
    return fromUrl;
  }
  return storage.getItem(KEY);
}

export function storeToken(storage: Storage, token: string): void {
  storage.setItem(KEY, token);
}

export function forgetToken(storage: Storage): void {
  storage.removeItem(KEY);
}
