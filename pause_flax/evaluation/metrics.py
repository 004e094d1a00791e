"""The downstream metric functions and postprocessors, under evaluation's name.

They live with the Tasks that register them, in `pause_flax.data.metrics`
(data never imports evaluation); this module hands the same functions on.
"""

from pause_flax.data.metrics import (RankTarget, accuracy, exact_match_score,
                                     extract_final_number, f1_score, first_word,
                                     gsm8k_accuracy, gsm8k_answer, lambada_word,
                                     last_word_accuracy, normalize_answer, qa_answers,
                                     rank_classification_accuracy,
                                     rank_classification_target, squad)

__all__ = [
    "RankTarget", "accuracy", "exact_match_score", "extract_final_number", "f1_score",
    "first_word", "gsm8k_accuracy", "gsm8k_answer", "lambada_word", "last_word_accuracy",
    "normalize_answer", "qa_answers", "rank_classification_accuracy",
    "rank_classification_target", "squad",
]
