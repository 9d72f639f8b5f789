/**
 * The status panel, boot phase pill and problem banner: what a person needs at a glance.
 */
import type { ProblemKind, Stats } from './protocol.js';
import { formatBytes, formatPercent } from './format.js';

const byId = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;

export type PhaseState = 'busy' | 'ready' | 'off' | 'error';

export function setPhase(text: string, state: PhaseState = 'busy'): void {
  const pill = byId('phase');
  pill.dataset.state = state;
  pill.querySelector('.text')!.textContent = text;
}

export function showDisk(info: { base: string; overlay: string; mode: string; copiedAt?: number | undefined; encryption?: string | undefined }): void {
  byId('base-url').textContent = info.base;
  const copy = info.copiedAt !== undefined ? `a copy taken at ${new Date(info.copiedAt).toLocaleTimeString()}, ` : '';
  const mode = info.mode === 'readonly' ? ` (read-only in this tab: ${copy}changes are not kept)` : '';
  byId('overlay-name').textContent = `browser storage: ${info.overlay}${mode}`;
  byId('overlay-name').dataset.mode = info.mode;
  showEncryption(info.encryption);
}

/** The overlay's encryption, as the status panel shows it. */
export function showEncryption(encryption: string | undefined): void {
  const line = byId('overlay-encryption');
  line.textContent = encryption ? `🔒 encrypted (${encryption}); the passphrase is asked on every open and never stored` : 'not encrypted';
  line.dataset.encrypted = String(encryption !== undefined);
}

/** Whether the browser promised to keep the site's storage (navigator.storage.persist()). */
export function showPersistence(granted: boolean): void {
  const kept = byId('persistence');
  kept.textContent = granted
    ? 'persistent: the browser keeps this disk until you delete it'
    : 'not persistent: the browser may evict this disk when it runs short of space. Download overlay to keep a copy.';
  kept.className = granted ? 'ok' : 'pending';
  kept.dataset.granted = String(granted);
}

/** `failed`: a write failed, so the unsaved bytes will not be saved (they are not 'saving'). */
export function showStats(stats: Stats, failed = false): void {
  // The bar shows what this browser holds of the base: fetched now or kept from an earlier session.
  const held = stats.baseFetched + stats.baseRestored;
  const fraction = stats.baseSize > 0 ? Math.min(1, held / stats.baseSize) : 0;
  const bar = byId('base-bar');
  (bar.firstElementChild as HTMLElement).style.width = `${(fraction * 100).toFixed(1)}%`;
  bar.setAttribute('aria-valuenow', String(Math.round(fraction * 100)));
  const restored = stats.baseRestored ? `; ${formatBytes(stats.baseRestored)} read from this browser's copy` : '';
  byId('base-fetched').textContent = stats.baseSize ? `${formatBytes(stats.baseFetched)} of ${formatBytes(stats.baseSize)} (${formatPercent(stats.baseFetched, stats.baseSize)})${restored}` : '–';
  byId('base-requests').textContent = String(stats.requests);
  const lookups = stats.cacheHits + stats.cacheMisses;
  byId('base-hits').textContent = lookups ? `${formatPercent(stats.cacheHits, lookups)} of ${lookups} reads` : '–';
  byId('overlay-size').textContent = formatBytes(stats.overlaySize);
  const saved = byId('overlay-saved');
  saved.textContent = !stats.unsaved ? 'all saved in this browser' : failed ? `${formatBytes(stats.unsaved)} not saved: writing failed` : `saving ${formatBytes(stats.unsaved)}…`;
  saved.className = !stats.unsaved ? 'ok' : failed ? 'failed' : 'pending';
  const stalled = stats.busy && stats.busy.ms > 3000 ? ` · waiting ${Math.round(stats.busy.ms / 1000)} s for ${stats.busy.what}` : '';
  byId('guest-io').textContent = `${stats.guestReads} reads, ${stats.guestWrites} writes (${formatBytes(stats.bytesWritten)})${stalled}`;
}

const problems = new Map<string, { message: string; retryAt?: number | undefined }>();
let ticker: ReturnType<typeof setInterval> | undefined;

/** Shows (or replaces) the problem of this kind; network problems count down to their next retry. */
export function showProblem(kind: ProblemKind | string, message: string, retryAt?: number): void {
  problems.set(kind, { message, retryAt });
  renderProblems();
  if (retryAt !== undefined && !ticker) ticker = setInterval(renderProblems, 500);
}

export function clearProblem(kind: ProblemKind | string): void {
  problems.delete(kind);
  renderProblems();
}

function renderProblems(): void {
  const box = byId('problems');
  const now = Date.now();
  let counting = false;
  box.replaceChildren(
    ...[...problems].map(([kind, problem]) => {
      const line = document.createElement('p');
      line.className = kind;
      line.dataset.kind = kind;
      let text = problem.message;
      if (problem.retryAt !== undefined) {
        const seconds = Math.max(0, Math.ceil((problem.retryAt - now) / 1000));
        text += seconds > 0 ? ` Retrying in ${seconds} s…` : ' Retrying now…';
        counting = true;
      }
      line.textContent = text;
      return line;
    }),
  );
  if (!counting && ticker) {
    clearInterval(ticker);
    ticker = undefined;
  }
}

/**
 * Asks for a passphrase in a modal dialog (twice with `confirm`, and then both must match and not be empty).
 * Resolves with it, or undefined when the person cancels. It lives only as long as the caller holds it.
 */
export async function askPassphrase(title: string, body: string, options: { confirm?: boolean; submit: string }): Promise<string | undefined> {
  const dialog = byId<HTMLDialogElement>('dialog');
  let note = '';
  for (;;) {
    dialog.querySelector('.title')!.textContent = title;
    const text = dialog.querySelector('.body')!;
    text.replaceChildren(document.createTextNode(note ? `${note} ${body}` : body));
    const fields = (options.confirm ? ['Passphrase', 'Passphrase again'] : ['Passphrase']).map((label) => {
      const input = document.createElement('input');
      input.type = 'password';
      input.autocomplete = 'off';
      input.setAttribute('aria-label', label);
      input.placeholder = label;
      input.className = 'passphrase';
      // Enter submits: the form's first button would otherwise be the one implicit submission picks.
      input.addEventListener('keydown', (event) => {
        if (event.key === 'Enter') {
          event.preventDefault();
          dialog.close('ok');
        }
      });
      return input;
    });
    text.append(...fields);
    const cancel = document.createElement('button');
    cancel.value = 'cancel';
    cancel.textContent = 'Cancel';
    const submit = document.createElement('button');
    submit.value = 'ok';
    submit.textContent = options.submit;
    submit.className = 'primary';
    dialog.querySelector('.buttons')!.replaceChildren(cancel, submit);
    dialog.returnValue = '';
    dialog.showModal();
    fields[0]!.focus();
    const choice = await new Promise<string>((resolve) => dialog.addEventListener('close', () => resolve(dialog.returnValue), { once: true }));
    const values = fields.map((field) => field.value);
    for (const field of fields) field.value = '';
    text.replaceChildren();
    if (choice !== 'ok') return undefined;
    if (values[0] === '') {
      note = 'The passphrase cannot be empty.';
      continue;
    }
    if (options.confirm && values[0] !== values[1]) {
      note = 'The two passphrases differ.';
      continue;
    }
    return values[0]!;
  }
}

/** A modal question with buttons; resolves with the chosen button's value ('' when dismissed with Esc). */
export function ask(title: string, body: string, buttons: Array<{ label: string; value: string; kind?: 'primary' | 'danger' }>): Promise<string> {
  const dialog = byId<HTMLDialogElement>('dialog');
  dialog.querySelector('.title')!.textContent = title;
  dialog.querySelector('.body')!.textContent = body;
  dialog.querySelector('.buttons')!.replaceChildren(
    ...buttons.map((button) => {
      const element = document.createElement('button');
      element.value = button.value;
      element.textContent = button.label;
      if (button.kind) element.className = button.kind;
      return element;
    }),
  );
  dialog.returnValue = '';
  dialog.showModal();
  return new Promise((resolve) => dialog.addEventListener('close', () => resolve(dialog.returnValue), { once: true }));
}
