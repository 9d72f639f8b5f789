/**
 * The guests this server offers: public/images/guests.json, written by the image builds (images/build.mjs),
 * lists every guest the checkout can build, whether it is built, and the command that builds it. The page
 * shows them in a list; choosing one opens it (`?base=` any URL still works and shows as "Other").
 */
import { ask } from './status-view.js';

export interface Guest {
  id: string;
  name: string;
  /** File name under /images/. */
  file: string;
  built: boolean;
  /** The command that builds it in a qcow86 checkout. */
  build: string;
  /** What the console shows while it boots: 'linux' (kernel messages, then a shell prompt). */
  boot: 'linux';
  memoryMiB: number;
}

/** The list, or none when the server has no list (then only `?base=` and the default guest are offered). */
export async function loadGuests(imagesUrl: string): Promise<Guest[]> {
  try {
    const response = await fetch(new URL('guests.json', imagesUrl), { cache: 'no-cache' });
    const type = response.headers.get('content-type') ?? '';
    // A missing file may come back as the app's index.html (Vite's dev server): only JSON counts.
    if (!response.ok || type.includes('html')) return [];
    const list = (await response.json()) as { guests?: unknown };
    return Array.isArray(list.guests) ? list.guests.filter(isGuest) : [];
  } catch {
    return [];
  }
}

function isGuest(value: unknown): value is Guest {
  const guest = value as Partial<Guest>;
  return typeof guest?.id === 'string' && typeof guest.name === 'string' && typeof guest.file === 'string' && /^[\w.-]+$/.test(guest.file) &&
    typeof guest.built === 'boolean' && typeof guest.build === 'string' && guest.boot === 'linux' && typeof guest.memoryMiB === 'number';
}

/** The listed guest whose image is at `baseUrl`, if any. */
export function guestAt(guests: Guest[], baseUrl: string, imagesUrl: string): Guest | undefined {
  return guests.find((guest) => new URL(guest.file, imagesUrl).href === baseUrl);
}

/**
 * Fills the <select>: one option per guest (unbuilt ones say so), and "Other" for a `?base=` URL that is not
 * in the list. Choosing a built guest reloads the page on it; an unbuilt one explains how to build it.
 */
export function showGuestList(select: HTMLSelectElement, guests: Guest[], current: Guest | undefined, baseUrl: string, imagesUrl: string): void {
  const options = guests.map((guest) => {
    const option = document.createElement('option');
    option.value = guest.id;
    option.textContent = guest.built ? guest.name : `${guest.name} — not built`;
    option.selected = guest === current;
    return option;
  });
  if (!current) {
    const other = document.createElement('option');
    other.value = '';
    other.textContent = `Other: ${baseUrl}`;
    other.selected = true;
    options.push(other);
  }
  select.replaceChildren(...options);
  select.disabled = guests.length === 0;
  select.addEventListener('change', () => {
    const guest = guests.find((entry) => entry.id === select.value);
    if (!guest) return;
    if (!guest.built) {
      select.value = current?.id ?? '';
      void ask(`${guest.name} is not built on this server`,
        `Build it in the qcow86 checkout with \`${guest.build}\` (it downloads its Debian packages once, then takes a few minutes), then choose it again.`,
        [{ label: 'OK', value: 'ok', kind: 'primary' }]);
      return;
    }
    const url = new URL(location.href);
    url.searchParams.set('base', new URL(guest.file, imagesUrl).pathname);
    url.searchParams.delete('disk');
    location.assign(url);
  });
}
