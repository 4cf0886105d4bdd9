//! The synthetic scenes and the automatic checks of issue 6.

use sd_lora::tiny::metrics::{dominant_colour, mean_style_score};
use sd_lora::tiny::scenes::{scenes, Look, SIZE};

#[test]
fn scenes_are_deterministic_and_the_checks_read_them() {
    let s = scenes(60, 7);
    assert_eq!(s, scenes(60, 7));
    assert_ne!(s, scenes(60, 8));
    let base: Vec<_> = s.iter().map(|x| x.render(Look::Base)).collect();
    let anime: Vec<_> = s.iter().map(|x| x.render(Look::Anime)).collect();
    assert!(base.iter().all(|i| i.dimensions() == (SIZE, SIZE)));
    // the colour check names every rendered colour in both looks
    for (sc, (b, a)) in s.iter().zip(base.iter().zip(&anime)) {
        assert_eq!(dominant_colour(b), Some(sc.colour), "base: {}", sc.caption());
        assert_eq!(dominant_colour(a), Some(sc.colour), "anime: {}", sc.caption());
    }
    let (sb, sa) = (mean_style_score(&base), mean_style_score(&anime));
    println!("style base {sb:?}\nstyle anime {sa:?}");
    assert!(sb.score < 0.25 && sa.score > 0.75, "{sb:?} {sa:?}");
    if let Ok(dir) = std::env::var("SD_LORA_PLOT_PREVIEW") {
        let png = sd_lora::plot::labelled_grid(
            &[base[..6].to_vec(), anime[..6].to_vec()],
            &["base".into(), "anime".into()],
            &s[..6].iter().map(|x| x.caption()).collect::<Vec<_>>(),
            None,
        )
        .unwrap();
        png.save(std::path::Path::new(&dir).join("scenes.png")).unwrap();
    }
}
