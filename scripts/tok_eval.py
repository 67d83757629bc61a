"""
Compression of our tokenizer (UTF-8 bytes per token, higher is better) against GPT-2 and GPT-4 on a
few embedded texts and on the first row group of the active dataset's train and val splits.

    python -m scripts.tok_eval

GPT-2 ("gpt2") and GPT-4 ("cl100k_base") come from tiktoken, which downloads them once and caches
them in $TIKTOKEN_CACHE_DIR; offline and uncached, the script says so and prints our column alone.
Relative diff % = (baseline_tokens - our_tokens) / baseline_tokens * 100 (positive = we use fewer
tokens). Leaves out: flags (there is nothing to choose) and colour.
"""

import os
import tempfile

import requests

from nanochat.dataset import get_dataset_name, parquets_iter_batched
from nanochat.report import get_report
from nanochat.tokenizer import Tokenizer, get_tokenizer

# -----------------------------------------------------------------------------
# Embedded samples, written for this script.

news_text = r"""
HARBOR CITY, March 14 (Wire) - The city council voted 7-2 on Tuesday night to approve a $48 million plan
to rebuild the aging seawall along the eastern waterfront, ending nearly three years of debate over how to
protect low-lying neighborhoods from storm surges that officials say have grown more frequent.

The project, which will be funded through a mix of municipal bonds and a federal resilience grant, calls for
replacing 2.3 miles of crumbling concrete with a raised barrier and a series of tidal gates. Construction is
expected to begin next spring and last roughly four years, according to the city's public works department.

"We have been patching this wall since before I was born," said council member Dana Ortiz, who represents
the Eastside district and has pushed for the repairs since her election in 2021. "Every winter we hold our
breath. Tonight we finally stop holding it."

Opponents on the council argued that the plan moves too fast and leaves too little room for public comment.
Council member Greg Whitfield, one of the two dissenting votes, said residents of the nearby Fisherman's Row
had not been told how the construction would affect access to the docks where many of them work.

"Nobody is against a stronger seawall," Whitfield said. "But people who make a living on that water deserve
more than a slideshow and a two-week comment window."

City engineers estimate that a major storm breaching the current wall could cause more than $300 million in
damage to homes, businesses and the regional rail line that runs parallel to the shore. A 2019 storm pushed
water three blocks inland and shut the rail line for nine days.

The mayor's office said in a statement that it would hold four community meetings before construction
begins and would set aside $1.2 million to help dock businesses affected by temporary closures. The first
meeting is scheduled for April 2 at the Eastside Community Center.
""".strip()

korean_text = r"""
한국의 전통 음식 문화는 계절과 지역에 따라 매우 다양하게 발전해 왔다. 봄에는 들판에서 나는 냉이와 달래 같은
나물을 무쳐 먹고, 여름에는 더위를 이기기 위해 삼계탕이나 냉면을 즐겨 먹는다. 가을에는 햅쌀과 햇과일로 차례를
지내며, 겨울이 오기 전에는 온 가족이 모여 김장을 담근다. 김장은 단순히 김치를 만드는 일이 아니라 이웃과 음식을
나누고 공동체의 정을 확인하는 행사이기도 하다. 최근에는 도시 생활이 바빠지면서 김치를 사 먹는 가정이 늘었지만,
여전히 많은 사람들이 어머니의 손맛을 그리워하며 주말마다 고향을 찾는다.
""".strip()

code_text = r'''
import heapq
from collections import defaultdict

def shortest_paths(graph, source):
    """Dijkstra's algorithm: distance from source to every reachable node.

    graph maps a node to a list of (neighbor, weight) pairs with weight >= 0.
    """
    dist = defaultdict(lambda: float("inf"))
    dist[source] = 0.0
    queue = [(0.0, source)]
    done = set()
    while queue:
        d, node = heapq.heappop(queue)
        if node in done:
            continue
        done.add(node)
        for neighbor, weight in graph.get(node, []):
            candidate = d + weight
            if candidate < dist[neighbor]:
                dist[neighbor] = candidate
                heapq.heappush(queue, (candidate, neighbor))
    return dict(dist)

if __name__ == "__main__":
    roads = {
        "A": [("B", 4), ("C", 1)],
        "C": [("B", 2), ("D", 7)],
        "B": [("D", 1)],
    }
    for node, d in sorted(shortest_paths(roads, "A").items()):
        print(f"{node}: {d:.1f}")
'''.strip()

math_text = r"""
\begin{theorem}[Infinitude of primes]
There are infinitely many prime numbers.
\end{theorem}

\begin{proof}
Suppose, for contradiction, that the primes form a finite set $\{p_1, p_2, \ldots, p_k\}$. Consider
\[
  N = \prod_{i=1}^{k} p_i + 1 .
\]
For each $i \in \{1, \dots, k\}$ we have $N \equiv 1 \pmod{p_i}$, so no $p_i$ divides $N$. Since $N > 1$,
it has at least one prime factor $q$, and $q \notin \{p_1, \ldots, p_k\}$, a contradiction.
\end{proof}

\begin{lemma}
For every integer $n \geq 1$,
\begin{equation}
  \sum_{j=1}^{n} j^3 = \left( \frac{n(n+1)}{2} \right)^2 .
\end{equation}
\end{lemma}

\begin{proof}
We argue by induction on $n$. For $n = 1$ both sides equal $1$. Assume the identity holds for some $n$.
Then
\begin{align*}
  \sum_{j=1}^{n+1} j^3 &= \left( \frac{n(n+1)}{2} \right)^2 + (n+1)^3 \\
  &= \frac{(n+1)^2}{4} \left( n^2 + 4(n+1) \right) \\
  &= \frac{(n+1)^2 (n+2)^2}{4} = \left( \frac{(n+1)(n+2)}{2} \right)^2 ,
\end{align*}
which is the claim for $n+1$. \qed
\end{proof}

\begin{remark}
Combining the lemma with $\sum_{j=1}^{n} j = \frac{n(n+1)}{2}$ gives
$\sum_{j=1}^{n} j^3 = \bigl( \sum_{j=1}^{n} j \bigr)^2$, a fact known as Nicomachus's theorem.
\end{remark}
""".strip()

science_text = r"""
Photosynthesis converts light energy into chemical energy stored in sugars. In the light-dependent
reactions, which take place in the thylakoid membranes of the chloroplast, chlorophyll absorbs photons
mainly in the blue (around 430 nm) and red (around 660 nm) parts of the spectrum. The absorbed energy
splits water molecules, releasing oxygen as a by-product and producing ATP and NADPH. These energy
carriers then drive the Calvin cycle in the stroma, where the enzyme RuBisCO fixes carbon dioxide into a
three-carbon compound. Overall, six molecules of CO2 and six of H2O yield one molecule of glucose
(C6H12O6) and six of O2. Although RuBisCO is probably the most abundant protein on Earth, it is slow and
sometimes binds oxygen instead of CO2, a wasteful process called photorespiration that C4 and CAM plants
reduce by concentrating carbon dioxide around the enzyme.
""".strip()

# -----------------------------------------------------------------------------

def first_row_group(split):
    return "\n".join(next(iter(parquets_iter_batched(split))))

dataset_name = get_dataset_name()
all_text = [("news", news_text), ("korean", korean_text), ("code", code_text), ("math", math_text),
            ("science", science_text), (f"{dataset_name}-train", first_row_group("train")),
            (f"{dataset_name}-val", first_row_group("val"))]

tokenizers = {"ours": get_tokenizer()}
for label, name in [("gpt2", "gpt2"), ("gpt4", "cl100k_base")]:
    try:
        tokenizers[label] = Tokenizer.from_pretrained(name)
    except requests.exceptions.RequestException as e:  # offline, proxy refusal, timeout, HTTP error
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.path.join(tempfile.gettempdir(), "data-gym-cache")
        print(f"{label} baseline skipped: tiktoken could not download {name!r} "
              f"({type(e).__name__}). Run this script once with network access; "
              f"tiktoken then caches it in $TIKTOKEN_CACHE_DIR (now {cache}).")

results = {}  # (tokenizer label, text name) -> (num bytes, num tokens)
for label, tok in tokenizers.items():
    for name, text in all_text:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, f"{label} does not round-trip the {name} text"
        results[(label, name)] = (len(text.encode("utf-8")), len(ids))

# -----------------------------------------------------------------------------
# Tables: one per available baseline, else our column alone

def ratio(label, name):
    num_bytes, num_tokens = results[(label, name)]
    return num_bytes / num_tokens

vocab = {label: tok.get_vocab_size() for label, tok in tokenizers.items()}
tables = []
baselines = [label for label in tokenizers if label != "ours"]
if not baselines:
    lines = [f"Ours (vocab {vocab['ours']:,}): bytes per token", "",
             f"| {'Text':<16} | {'Bytes':>7} | {'Tokens':>7} | {'Ratio':>6} |",
             f"|{'-' * 18}|{'-' * 9}|{'-' * 9}|{'-' * 8}|"]
    for name, _ in all_text:
        num_bytes, num_tokens = results[("ours", name)]
        lines.append(f"| {name:<16} | {num_bytes:>7} | {num_tokens:>7} | {ratio('ours', name):>6.2f} |")
    tables.append(lines)
for base in baselines:
    lines = [f"{base.upper()} (vocab {vocab[base]:,}) vs ours (vocab {vocab['ours']:,})", "",
             f"| {'Text':<16} | {'Bytes':>7} | {base + ' tok':>9} | {base + ' ratio':>10} "
             f"| {'ours tok':>8} | {'ours ratio':>10} | {'Rel diff %':>10} |",
             f"|{'-' * 18}|{'-' * 9}|{'-' * 11}|{'-' * 12}|{'-' * 10}|{'-' * 12}|{'-' * 12}|"]
    for name, _ in all_text:
        num_bytes, base_tokens = results[(base, name)]
        our_tokens = results[("ours", name)][1]
        diff = (base_tokens - our_tokens) / base_tokens * 100
        lines.append(f"| {name:<16} | {num_bytes:>7} | {base_tokens:>9} "
                     f"| {ratio(base, name):>10.2f} | {our_tokens:>8} | "
                     f"{ratio('ours', name):>10.2f} | {diff:>+10.1f} |")
    tables.append(lines)

for lines in tables:
    print("\n" + "\n".join(lines))
get_report().log("Tokenizer evaluation", ["\n".join(lines) for lines in tables])
